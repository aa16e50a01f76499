"""K/V from prefill pods to attention pods over NIXL (`--transport nixl`), all real processes.

- The K/V a NIXL prefill pod writes are bit for bit what a gRPC prefill pod writes (the attention
  outputs of a step over them are equal), for a prompt of several blocks with a partial last block,
  head-partitioned over 2 pods; prompts batched together (and one longer than the staging buffer)
  decode like a local forward.
- PlanImport checks the sequence (NOT_FOUND / FAILED_PRECONDITION naming the fix), a gRPC-only pod
  refuses it, and a Free waits while a plan is outstanding until CompleteImport(abandon) drops it.
- With the real model (slow), greedy tokens after a NIXL prefill equal transformers'.

Pods register in a real Redis (valkey) under a per-module key prefix: NIXL agents find each other's
metadata there. Every pod is a subprocess on a free port (`--port 0`), killed by a finalizer.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention
from services.core.attention import AttentionPart, SeqChunk
from services.core.model.config import ModelConfig
from services.core.model.load import LoadedModel, load_model
from services.core.model.weights import expected_shapes
from services.core.placement import Placement
from services.core.redis_server import RedisServer
from services.core.registry import RedisSettings, connect
from services.core.transport.nixl_agent import metadata_key
from services.decode.remote_attention import RemoteAttention, RemoteAttentionOptions
from services.proto import attention_pb2 as pb
from services.proto import attention_pb2_grpc as pb_grpc
from services.proto import prefill_pb2, prefill_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 96
TINY = {  # 3 layers, 3 KV heads, G = 2, D = 8
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": 48,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
FAST = RemoteAttentionOptions(rpc_timeout_s=5, connect_timeout_s=60, layer_timeout_s=10)


# ---- processes ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Pod:
    process: subprocess.Popen[str]
    address: str

    def attention(self) -> pb_grpc.AttentionStub:
        return pb_grpc.AttentionStub(grpc.insecure_channel(self.address))

    def prefill(self) -> prefill_pb2_grpc.PrefillStub:
        return prefill_pb2_grpc.PrefillStub(grpc.insecure_channel(self.address))


@pytest.fixture(scope="module")
def redis_env(redis_server: RedisServer) -> dict[str, str]:
    """Environment for pods: the session's Redis under a key prefix of this module."""
    return {"DISAGG_REDIS_URL": redis_server.url, "DISAGG_REDIS_KEY_PREFIX": f"test-{uuid.uuid4().hex[:12]}:"}


@pytest.fixture(scope="module")
def launch(
    tmp_path_factory: pytest.TempPathFactory, redis_env: dict[str, str]
) -> Iterator[Callable[..., list[Pod]]]:
    """launch((role, model, settings), ...) starts pods in parallel; all are killed at the end."""
    processes: list[subprocess.Popen[str]] = []
    logs = tmp_path_factory.mktemp("pod-logs")

    def _launch(*specs: tuple[str, Path, dict[str, str]]) -> list[Pod]:
        started = []
        for role, model, settings in specs:
            prefix = f"DISAGG_{role.upper()}_"
            env = {**os.environ, **redis_env, f"{prefix}MODEL": str(model), f"{prefix}PORT": "0"}
            env.update({prefix + k.upper(): v for k, v in settings.items()})
            log = logs / f"{role}-{len(processes)}.log"
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", f"services.{role}.server"],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=log.open("w"),
                    text=True,
                )
            )
            started.append((processes[-1], log))
        return [_listening(process, log) for process, log in started]

    yield _launch
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _listening(process: subprocess.Popen[str], log: Path) -> Pod:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"pod did not start: {line!r}\n{log.read_text()[-3000:]}")
    return Pod(process, line.rsplit(" ", 1)[1].strip())


@dataclass(slots=True)
class Cluster:
    attention: list[Pod]  # two pods, transport nixl
    nixl: Pod  # prefill pod, transport nixl (2 write lanes, the default)
    grpc: Pod  # prefill pod, transport grpc
    one_lane: Pod | None  # prefill pod, transport nixl, nixl_lanes 1 (tiny model only)

    def placement(self, layout: str, num_kv_heads: int) -> Placement:
        a, b = (p.address for p in self.attention)
        if layout == "request":
            return Placement.request_partitioned(a, num_kv_heads)
        return Placement.head_partitioned([a, b], num_kv_heads)  # a: heads 0-1, b: head 2


def start_cluster(
    launch: Callable[..., list[Pod]], model: Path, one_lane: bool = False, **prefill: str
) -> Cluster:
    attention = {"kv_budget_bytes": str(32 << 20), "transport": "nixl"}
    specs = [
        ("attention", model, attention),
        ("attention", model, attention),
        ("prefill", model, {**prefill, "transport": "nixl"}),
        ("prefill", model, prefill),
    ]
    if one_lane:
        specs.append(("prefill", model, {**prefill, "transport": "nixl", "nixl_lanes": "1"}))
    a, b, nixl, grpc_pod, *rest = launch(*specs)
    return Cluster([a, b], nixl, grpc_pod, rest[0] if rest else None)


# ---- the tiny model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete model folder with random weights and a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-model")
    (folder / "config.json").write_text(json.dumps(TINY))
    generator = torch.Generator().manual_seed(0)
    weights = {
        name: torch.ones(shape) if len(shape) == 1 else 0.3 * torch.randn(shape, generator=generator)
        for name, shape in expected_shapes(ModelConfig.from_dict(TINY)).items()
    }
    save_file(weights, str(folder / "model.safetensors"))
    vocab = {f"t{i}": i for i in range(VOCAB)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> LoadedModel:
    return load_model(str(tiny_folder), show_progress=False)


@pytest.fixture(scope="module")
def tiny_cluster(launch: Callable[..., list[Pod]], tiny_folder: Path) -> Cluster:
    # max_num_tokens 64: the NIXL pod's staging buffer starts at 64 tokens and grows for longer prompts.
    return start_cluster(launch, tiny_folder, one_lane=True, max_num_tokens="64")


# ---- helpers --------------------------------------------------------------------------------------
def prefill(pod: Pod, seq_id: int, tokens: list[int], placement: Placement) -> prefill_pb2.PrefillResponse:
    request = prefill_pb2.PrefillRequest(seq_id=seq_id, token_ids=tokens, request_id=f"test-{seq_id}")
    for e in placement.entries:
        request.placement.entries.add(
            address=e.address, kv_head_start=e.kv_head_start, kv_head_count=e.kv_head_count
        )
    response: prefill_pb2.PrefillResponse = pod.prefill().Prefill(request, timeout=60)
    return response


def decode_rows(dense: Any, part: AttentionPart, rows: list[tuple[int, int, int]]) -> torch.Tensor:
    """One forward of single-token rows (seq_id, position, token) -> logits [B, V]."""
    step = part.begin([SeqChunk(seq, pos, 1) for seq, pos, _ in rows])
    tokens = torch.tensor([token for _, _, token in rows])
    hidden = dense.forward(tokens, torch.tensor([pos for _, pos, _ in rows]), step)
    return dense.logits(hidden)


def local_logits(model: LoadedModel, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Logits [B, V] after each prompt, then after each of `steps` greedy tokens, all computed locally."""
    cfg, dense = model.config, model.dense
    blocks = sum(-(-(len(p) + steps) // 16) * cfg.num_kv_heads for p in prompts)
    local = LocalAttention(
        KVPool(KVPoolConfig(cfg.num_layers, cfg.head_dim), blocks), cfg.num_kv_heads, cfg.num_heads
    )
    last = []
    for seq, prompt in enumerate(prompts):
        local.open(seq)
        local.reserve(seq, len(prompt) + steps)
        n = len(prompt)
        hidden = dense.forward(torch.tensor(prompt), torch.arange(n), local.begin([SeqChunk(seq, 0, n)]))
        last.append(dense.logits(hidden[-1:]))
    logits = [torch.cat(last)]
    for t in range(steps):
        rows = [(seq, len(p) + t, int(logits[-1][seq].argmax())) for seq, p in enumerate(prompts)]
        logits.append(decode_rows(dense, local, rows))
    return logits


def remote_logits(
    model: LoadedModel, pod: Pod, placement: Placement, prompts: list[list[int]], steps: int
) -> list[torch.Tensor]:
    """Prefill prompt[:-1] of every prompt at once on `pod`, then decode on the attention pods (the
    last prompt token, then `steps` greedy tokens); logits [B, V] after each forward."""
    cfg = model.config
    remote = RemoteAttention(cfg, torch.float32, placement, FAST)
    try:
        for seq, prompt in enumerate(prompts):
            remote.open(seq)
            remote.reserve(seq, len(prompt) + steps)
        responses: list[Any] = [None] * len(prompts)

        def call(seq: int) -> None:
            responses[seq] = prefill(pod, remote.wire_id(seq), prompts[seq][:-1], placement)

        threads = [threading.Thread(target=call, args=(seq,)) for seq in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        for prompt, response in zip(prompts, responses, strict=True):
            tokens = len(prompt) - 1
            assert response.tokens == tokens
            assert response.kv_bytes == 2 * cfg.num_layers * tokens * cfg.num_kv_heads * cfg.head_dim * 4
        rows = [(seq, len(p) - 1, p[-1]) for seq, p in enumerate(prompts)]
        logits = [decode_rows(model.dense, remote, rows)]
        for t in range(steps):
            rows = [(seq, len(p) + t, int(logits[-1][seq].argmax())) for seq, p in enumerate(prompts)]
            logits.append(decode_rows(model.dense, remote, rows))
        return logits
    finally:
        for seq in range(len(prompts)):
            remote.free(seq)
        remote.close()


# ---- NIXL equals gRPC --------------------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.parametrize("lanes", [2, 1])
def test_nixl_import_equals_grpc_import_bit_for_bit(
    lanes: int, tiny: LoadedModel, tiny_cluster: Cluster
) -> None:
    """Layers alternate between the NIXL pod's write lanes (2, the default) or all take one."""
    cfg = tiny.config
    nixl_pod = tiny_cluster.nixl if lanes == 2 else tiny_cluster.one_lane
    assert nixl_pod is not None
    placement = tiny_cluster.placement("head", cfg.num_kv_heads)
    remote = RemoteAttention(cfg, torch.float32, placement, FAST)
    torch.manual_seed(3)
    prompt = torch.randint(0, VOCAB, (45,)).tolist()  # 44 prefilled: blocks of 16, 16 and 12 positions
    n = len(prompt) - 1
    try:
        for seq, pod in enumerate((tiny_cluster.grpc, nixl_pod)):
            remote.open(seq)
            remote.reserve(seq, n + 1)
            response = prefill(pod, remote.wire_id(seq), prompt[:-1], placement)
            assert response.kv_bytes == 2 * cfg.num_layers * n * cfg.num_kv_heads * cfg.head_dim * 4
        # One step per sequence with the same new token: the outputs attend over every imported K/V.
        q = torch.randn(cfg.num_layers, 1, cfg.num_heads, cfg.head_dim)  # [L, N=1, Hq, D]
        kv = torch.randn(2, cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim)  # [K|V, L, N, Hkv, D]
        outputs = []
        for seq in (0, 1):
            step = remote.begin([SeqChunk(seq, n, 1)])
            outputs.append(
                [step.attend(layer, q[layer], kv[0, layer], kv[1, layer]) for layer in range(cfg.num_layers)]
            )
        for via_grpc, via_nixl in zip(*outputs, strict=True):
            assert torch.equal(via_grpc, via_nixl)
        # And both decode like a local forward (the K/V are right, not just equal).
        got = decode_rows(tiny.dense, remote, [(1, n, prompt[-1])])
        torch.testing.assert_close(got, local_logits(tiny, [prompt], steps=0)[0], rtol=1e-4, atol=1e-4)
    finally:
        for seq in (0, 1):
            remote.free(seq)
        remote.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", ["request", "head"])
def test_batched_nixl_prefills_decode_like_a_local_forward(
    layout: str, tiny: LoadedModel, tiny_cluster: Cluster
) -> None:
    # Over max_num_tokens=64 in all: several forwards of mixed prompts share the staging buffer, and
    # the 71-token prompt runs alone after growing it.
    torch.manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (41, 31, 4, 71)]
    placement = tiny_cluster.placement(layout, tiny.config.num_kv_heads)
    got = remote_logits(tiny, tiny_cluster.nixl, placement, prompts, steps=3)
    for remote_step, local_step in zip(got, local_logits(tiny, prompts, steps=3), strict=True):
        torch.testing.assert_close(remote_step, local_step, rtol=1e-4, atol=1e-4)


# ---- the import protocol's checks -------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_plan_import_checks_the_sequence_and_free_waits_for_the_plan(
    launch: Callable[..., list[Pod]], tiny_folder: Path, tiny_cluster: Cluster
) -> None:
    pod = tiny_cluster.attention[0]
    stub = pod.attention()
    never_opened = 987654321
    stub.Open(pb.OpenRequest(seq_id=7, kv_head_start=0, kv_head_count=2, policy="dense"), timeout=5)
    try:
        cases = [
            (pb.PlanImportRequest(seq_id=never_opened, start=0, length=4), "NOT_FOUND", "call Open first"),
            (pb.PlanImportRequest(seq_id=7, start=0, length=20), "FAILED_PRECONDITION", "Reserve 20 tokens"),
            (pb.PlanImportRequest(seq_id=7, start=0, length=0), "INVALID_ARGUMENT", "length >= 1"),
        ]
        for request, code, needle in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.PlanImport(request, timeout=5)
            assert info.value.code().name == code and needle in info.value.details(), info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.CompleteImport(pb.CompleteImportRequest(transfer_id=10**9), timeout=5)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND and "PlanImport again" in info.value.details()
        # The NIXL prefill pod passes the refusal on, naming the pod.
        with pytest.raises(grpc.RpcError) as info:
            prefill(tiny_cluster.nixl, 7, [1, 2, 3], Placement.request_partitioned(pod.address, 3))
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert f"attention pod {pod.address}" in info.value.details() and "PlanImport" in info.value.details()

        # A planned sequence cannot be freed until the plan completes or is abandoned.
        assert stub.Reserve(pb.ReserveRequest(seq_id=7, num_tokens=20), timeout=5).reserved.new_blocks == 4
        plan = stub.PlanImport(pb.PlanImportRequest(seq_id=7, start=0, length=20), timeout=5)
        assert [len(lane.block_ids) for lane in plan.lanes] == [2, 2] and plan.first_block == 0
        assert len(plan.k_bases) == len(plan.v_bases) == 3 and plan.block_bytes == 16 * 8 * 4
        freeing = stub.Free.future(pb.FreeRequest(seq_id=7), timeout=30)
        time.sleep(0.5)
        assert not freeing.done()
        stub.CompleteImport(pb.CompleteImportRequest(transfer_id=plan.transfer_id, abandon=True), timeout=5)
        assert freeing.result().released_blocks == 4
    finally:
        stub.Free(pb.FreeRequest(seq_id=7), timeout=5)
    # A pod serving gRPC imports only says how to enable NIXL.
    (grpc_only,) = launch(("attention", tiny_folder, {"kv_budget_bytes": str(4 << 20)}))
    with pytest.raises(grpc.RpcError) as info:
        grpc_only.attention().PlanImport(pb.PlanImportRequest(seq_id=1, start=0, length=1), timeout=5)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "DISAGG_ATTENTION_TRANSPORT=nixl" in info.value.details()


@pytest.mark.timeout(120)
def test_orphan_reaper_waits_for_an_outstanding_nixl_plan(tiny_cluster: Cluster) -> None:
    """A decode pod dies while a prefill pod's WRITE into its sequence may be in flight: the reaper
    frees the orphaned sequence only once the plan is done, never under a WRITE that could land in
    blocks already given to someone else."""
    stub = tiny_cluster.attention[1].attention()
    ghost = f"decode-pod-that-died-{uuid.uuid4().hex[:8]}"  # never registered: missing at once
    open_ = pb.OpenRequest(seq_id=8, kv_head_start=0, kv_head_count=2, policy="dense", owner=ghost)
    stub.Open(open_, timeout=5)
    stub.Reserve(pb.ReserveRequest(seq_id=8, num_tokens=20), timeout=5)
    plan = stub.PlanImport(pb.PlanImportRequest(seq_id=8, start=0, length=20), timeout=5)
    used = stub.Stats(pb.StatsRequest(), timeout=5).blocks_used
    # Two reaper rounds (one pod TTL each, 3 s) find the owner missing; the free must still wait.
    time.sleep(8)
    assert stub.Stats(pb.StatsRequest(), timeout=5).blocks_used == used, "freed under a NIXL plan"
    stub.CompleteImport(pb.CompleteImportRequest(transfer_id=plan.transfer_id, abandon=True), timeout=5)
    deadline = time.monotonic() + 10
    while stub.Stats(pb.StatsRequest(), timeout=5).blocks_used != used - 4:
        assert time.monotonic() < deadline, "the reaper did not free the orphan after the plan ended"
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_nixl_pods_publish_metadata_and_exit_cleanly(
    launch: Callable[..., list[Pod]], tiny_folder: Path, redis_env: dict[str, str]
) -> None:
    attention, prefill_pod = launch(
        ("attention", tiny_folder, {"kv_budget_bytes": str(4 << 20), "transport": "nixl", "pod_id": "nx-a"}),
        ("prefill", tiny_folder, {"transport": "nixl", "pod_id": "nx-p"}),
    )
    client = connect(RedisSettings(url=redis_env["DISAGG_REDIS_URL"]))
    key = metadata_key(redis_env["DISAGG_REDIS_KEY_PREFIX"], "nx-a")
    deadline = time.monotonic() + 10
    while client.get(key) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 0 < client.pttl(key) <= 3000  # refreshed with the pod TTL, like the pod's registration
    for pod in (attention, prefill_pod):
        pod.process.send_signal(signal.SIGTERM)
        assert pod.process.wait(15) == 0
    assert client.get(key) is None  # deleted on the way out
    client.close()


# ---- the real model: greedy tokens equal transformers -----------------------------------------------
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
NEW_TOKENS = 8


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_model_nixl_prefill_then_decode_equals_transformers(
    launch: Callable[..., list[Pod]], model: LoadedModel, model_folder: Path, hf_reference_model: Any
) -> None:
    cluster = start_cluster(launch, model_folder)
    tok = model.tokenizer
    long_text = (ROOT / "tests" / "data" / "alice_ch1.txt").read_text()[:1500]
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT]
    prompts.append(tok.encode(long_text + "\n\nWho is the story about?"))
    placement = cluster.placement("head", model.config.num_kv_heads)
    logits = remote_logits(model, cluster.nixl, placement, prompts, steps=NEW_TOKENS - 1)
    got = torch.stack([step.argmax(-1) for step in logits], dim=1).tolist()  # [B, NEW_TOKENS]
    for ids, tokens in zip(prompts, got, strict=True):
        x = torch.tensor([ids])
        out = hf_reference_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False
        )
        assert tokens == out[0, len(ids) :].tolist()
