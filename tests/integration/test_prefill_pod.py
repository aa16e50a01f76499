"""The prefill pod as a real process, writing K/V into attention pods that are real processes.

- K/V it writes are what a local forward holds: after Prefill(prompt[:-1]), decoding the last
  prompt token and a few more on the attention pods gives the local forward's logits, for
  request- and head-partitioned placements, with prompts prefilled concurrently. With the real
  model (slow), greedy tokens equal transformers'.
- The engine batches FIFO up to max_num_tokens, refuses past max_queued_tokens, skips callers that
  went away, and fails only the prompt whose pod is unreachable (in-process engine, real pods).
- Bad input gets INVALID_ARGUMENT / FAILED_PRECONDITION naming the problem, and the pod keeps serving.
- A killed attention pod makes Prefill fail promptly with UNAVAILABLE naming it; SIGTERM exits cleanly.

Fast tests use a tiny random-weight model (3 layers, 3 KV heads, G = 2, D = 8) written here. Every
pod is a subprocess on a free port (`--port 0`), killed by a finalizer.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
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
from services.core.model.dense import DenseModel
from services.core.model.load import LoadedModel, load_model
from services.core.model.weights import expected_shapes
from services.core.placement import Placement, PlacementEntry
from services.decode.remote_attention import RemoteAttention, RemoteAttentionOptions
from services.prefill.engine import (
    CallerGoneError,
    PodClosingError,
    PrefillEngine,
    PrefillOptions,
    PrefillRequest,
    QueueFullError,
)
from services.prefill.kv_export import AttentionChannels, AttentionPodUnreachableError, KVExporter
from services.proto import prefill_pb2, prefill_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 96
TINY = {
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


def _spawn(role: str, model: Path, log: Path, settings: dict[str, str]) -> subprocess.Popen[str]:
    prefix = f"DISAGG_{role.upper()}_"
    env = {**os.environ, f"{prefix}MODEL": str(model), f"{prefix}PORT": "0"}
    env.update({prefix + k.upper(): v for k, v in settings.items()})
    env.pop("DISAGG_REDIS_URL", None)  # standalone pods
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{role}.server"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def _listening(process: subprocess.Popen[str], log: Path) -> Pod:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"pod did not start: {line!r}\n{log.read_text()[-3000:]}")
    return Pod(process, line.rsplit(" ", 1)[1].strip())


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., list[Pod]]]:
    """launch((role, model, settings), ...) starts pods in parallel; all are killed at the end."""
    processes: list[subprocess.Popen[str]] = []
    logs = tmp_path_factory.mktemp("pod-logs")

    def _launch(*specs: tuple[str, Path, dict[str, str]]) -> list[Pod]:
        started = []
        for role, model, settings in specs:
            log = logs / f"{role}-{len(processes)}.log"
            processes.append(_spawn(role, model, log, settings))
            started.append((processes[-1], log))
        return [_listening(process, log) for process, log in started]

    yield _launch
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@dataclass(slots=True)
class Cluster:
    attention: list[Pod]
    prefill: Pod

    def stub(self) -> prefill_pb2_grpc.PrefillStub:
        return prefill_pb2_grpc.PrefillStub(grpc.insecure_channel(self.prefill.address))

    def placement(self, layout: str, num_kv_heads: int) -> Placement:
        a, b = (p.address for p in self.attention)
        if layout == "request":
            return Placement.request_partitioned(a, num_kv_heads)
        return Placement.head_partitioned([a, b], num_kv_heads)


def start_cluster(launch: Callable[..., list[Pod]], model: Path, **prefill: str) -> Cluster:
    budget = {"kv_budget_bytes": str(32 << 20)}
    *attention, prefill_pod = launch(
        ("attention", model, budget), ("attention", model, budget), ("prefill", model, prefill)
    )
    return Cluster(attention, prefill_pod)


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
    return start_cluster(launch, tiny_folder, max_num_tokens="64")


# ---- helpers ----------------------------------------------------------------------------------------
def prefill_request(
    seq_id: int, tokens: list[int], placement: Placement | tuple[PlacementEntry, ...]
) -> prefill_pb2.PrefillRequest:
    """A Prefill request; a tuple of entries is sent as it is, unchecked."""
    request = prefill_pb2.PrefillRequest(seq_id=seq_id, token_ids=tokens, request_id=f"test-{seq_id}")
    for e in placement.entries if isinstance(placement, Placement) else placement:
        request.placement.entries.add(
            address=e.address, kv_head_start=e.kv_head_start, kv_head_count=e.kv_head_count
        )
    return request


def decode_rows(dense: DenseModel, part: AttentionPart, rows: list[tuple[int, int, int]]) -> torch.Tensor:
    """One forward of single-token rows (seq_id, position, token) -> logits [B, V]."""
    step = part.begin([SeqChunk(seq, pos, 1) for seq, pos, _ in rows])
    tokens = torch.tensor([token for _, _, token in rows])
    hidden = dense.forward(tokens, torch.tensor([pos for _, pos, _ in rows]), step)
    return dense.logits(hidden)


def local_logits(model: LoadedModel, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Logits [B, V] after each prompt, then after each of `steps` greedy tokens, all computed locally."""
    cfg, dense = model.config, model.dense
    blocks = sum(-(-(len(p) + steps) // 16) * cfg.num_kv_heads for p in prompts)
    pool = KVPool(KVPoolConfig(cfg.num_layers, cfg.head_dim, block_size=16), blocks)
    local = LocalAttention(pool, cfg.num_kv_heads, cfg.num_heads)
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


def prefill_concurrently(
    stub: prefill_pb2_grpc.PrefillStub, requests: list[prefill_pb2.PrefillRequest]
) -> list[prefill_pb2.PrefillResponse]:
    responses: list[Any] = [None] * len(requests)

    def call(index: int) -> None:
        responses[index] = stub.Prefill(requests[index], timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return responses


def remote_logits(
    model: LoadedModel, cluster: Cluster, layout: str, prompts: list[list[int]], steps: int
) -> list[torch.Tensor]:
    """Prefill prompt[:-1] of every prompt at once on the pod, then decode on the attention pods
    (the last prompt token, then `steps` greedy tokens); logits [B, V] after each forward."""
    cfg = model.config
    remote = RemoteAttention(cfg, torch.float32, cluster.placement(layout, cfg.num_kv_heads), FAST)
    try:
        for seq, prompt in enumerate(prompts):
            remote.open(seq)
            remote.reserve(seq, len(prompt) + steps)
        placement = cluster.placement(layout, cfg.num_kv_heads)
        requests = [prefill_request(remote.wire_id(s), p[:-1], placement) for s, p in enumerate(prompts)]
        for request, response in zip(requests, prefill_concurrently(cluster.stub(), requests), strict=True):
            assert response.tokens == len(request.token_ids)
            # K and V of every layer, position and KV head, fp32.
            assert (
                response.kv_bytes
                == 2 * cfg.num_layers * response.tokens * cfg.num_kv_heads * cfg.head_dim * 4
            )
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


def free_address() -> str:
    """host:port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# ---- exactness on the tiny model --------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", ["request", "head"])
def test_prefilled_kv_decodes_like_a_local_forward(
    layout: str, tiny: LoadedModel, tiny_cluster: Cluster
) -> None:
    # 40 + 30 + 3 + 70 tokens: over max_num_tokens=64, so the pod runs several forwards of mixed prompts.
    torch.manual_seed(1)
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (41, 31, 4, 71)]
    got = remote_logits(tiny, tiny_cluster, layout, prompts, steps=4)
    expected = local_logits(tiny, prompts, steps=4)
    for remote_step, local_step in zip(got, expected, strict=True):
        torch.testing.assert_close(remote_step, local_step, rtol=1e-4, atol=1e-4)
    stats = tiny_cluster.stub().Stats(prefill_pb2.PrefillStatsRequest(), timeout=5)
    assert stats.max_model_len == 256 and stats.max_num_tokens == 64
    assert stats.queued_requests == 0 and stats.queued_tokens == 0 and stats.completed >= 4


# ---- the engine in-process: batching, queue limit, per-prompt failures ------------------------------
@pytest.mark.timeout(120)
def test_engine_batches_fifo_and_fails_only_the_prompt_whose_pod_is_down(
    tiny: LoadedModel, tiny_cluster: Cluster
) -> None:
    cfg = tiny.config
    placement = tiny_cluster.placement("head", cfg.num_kv_heads)
    dead = Placement.request_partitioned(free_address(), cfg.num_kv_heads)
    # Messages of at most 5000 bytes: 7 positions of 2 heads, so every layer goes out in several chunks.
    exporter = KVExporter(AttentionChannels(5000), cfg.head_dim, torch.float32)
    assert exporter.rows_per_chunk(2) == 7
    engine = PrefillEngine(tiny.dense, exporter, PrefillOptions(max_num_tokens=40, max_queued_tokens=100))
    remote = RemoteAttention(cfg, torch.float32, placement, FAST)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (21, 16, 31)]
    try:
        for seq, prompt in enumerate(prompts):
            remote.open(seq)
            remote.reserve(seq, len(prompt))
        # The worker has not started: everything below queues, then runs as forwards [a, dead], [c].
        jobs = [
            engine.submit(PrefillRequest(remote.wire_id(0), prompts[0][:-1], placement)),
            engine.submit(PrefillRequest(remote.wire_id(1), prompts[1][:-1], dead)),
            engine.submit(PrefillRequest(remote.wire_id(2), prompts[2][:-1], placement)),
        ]
        gone = engine.submit(PrefillRequest(remote.wire_id(1), [1, 2], placement), is_active=lambda: False)
        with pytest.raises(QueueFullError, match="limit of 100"):
            engine.submit(PrefillRequest(remote.wire_id(1), [1] * 40, placement))
        engine.start()
        assert jobs[0].wait().tokens == 20 and jobs[2].wait().tokens == 30
        with pytest.raises(AttentionPodUnreachableError) as info:
            jobs[1].wait()
        assert dead.entries[0].address in str(info.value) and "UNAVAILABLE" in str(info.value)
        with pytest.raises(CallerGoneError):
            gone.wait()
        stats = engine.stats()
        assert (stats.forwards, stats.completed, stats.queued_tokens) == (2, 2, 0)
        # The prompts that went through hold exactly the local K/V.
        rows = [(seq, len(prompts[seq]) - 1, prompts[seq][-1]) for seq in (0, 2)]
        got = decode_rows(tiny.dense, remote, rows)
        expected = local_logits(tiny, [prompts[0], prompts[2]], steps=0)[0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        engine.close()
        with pytest.raises(PodClosingError):
            engine.submit(PrefillRequest(remote.wire_id(0), [1], placement))
    finally:
        engine.stop()
        for seq in range(len(prompts)):
            remote.free(seq)
        remote.close()


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_bad_requests_get_their_status_and_the_pod_keeps_serving(tiny_cluster: Cluster) -> None:
    stub = tiny_cluster.stub()
    a, b = (p.address for p in tiny_cluster.attention)
    good = tiny_cluster.placement("head", 3)
    gap = (PlacementEntry(a, 0, 1), PlacementEntry(b, 2, 1))
    remote = RemoteAttention(ModelConfig.from_dict(TINY), torch.float32, good, FAST)
    invalid, refused = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    try:
        remote.open(0)
        remote.reserve(0, 8)
        remote.open(1)  # opened but never reserved
        seq, unreserved, never_opened = remote.wire_id(0), remote.wire_id(1), 987654321
        cases = [
            (prefill_request(seq, [], good), invalid, "no tokens"),
            (prefill_request(seq, [1, VOCAB], good), invalid, f"token id {VOCAB} (position 1)"),
            (prefill_request(seq, [1] * 257, good), invalid, "at most 256"),
            (prefill_request(seq, [1, 2], gap), invalid, "gap or overlap at head 1"),
            (prefill_request(seq, [1, 2], Placement.request_partitioned(a, 2)), invalid, "model has 3"),
            (prefill_request(never_opened, [1, 2], good), refused, "is not open on this pod"),
            (prefill_request(unreserved, [1, 2], good), refused, "Reserve 2 tokens first"),
        ]
        for request, code, needle in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Prefill(request, timeout=30)
            assert info.value.code() is code, info.value.details()
            assert needle in info.value.details()
            if code is refused:  # names the pod that refused
                assert (
                    f"attention pod {a}" in info.value.details()
                    or f"attention pod {b}" in info.value.details()
                )
        assert stub.Prefill(prefill_request(seq, [5, 6, 7], good), timeout=30).tokens == 3
    finally:
        remote.free(0)
        remote.free(1)
        remote.close()


# ---- failures and shutdown ---------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_killed_attention_pod_fails_prefill_with_unavailable(
    launch: Callable[..., list[Pod]], tiny_folder: Path, tiny_cluster: Cluster
) -> None:
    (doomed,) = launch(("attention", tiny_folder, {"kv_budget_bytes": str(4 << 20)}))
    cfg = ModelConfig.from_dict(TINY)
    survivor = tiny_cluster.attention[0].address
    placement = Placement.head_partitioned([survivor, doomed.address], 3)
    remote = RemoteAttention(cfg, torch.float32, placement, FAST)
    stub = tiny_cluster.stub()
    try:
        remote.open(0)
        remote.reserve(0, 32)
        assert stub.Prefill(prefill_request(remote.wire_id(0), [3] * 30, placement), timeout=30).tokens == 30
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(10)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Prefill(prefill_request(remote.wire_id(0), [4] * 30, placement), timeout=30)
        assert time.monotonic() - started < 5
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert doomed.address in info.value.details()
    finally:
        remote.free(0)  # the dead pod's share went with it
        remote.close()
    alone = Placement.request_partitioned(survivor, 3)
    other = RemoteAttention(cfg, torch.float32, alone, FAST)
    try:
        other.open(0)
        other.reserve(0, 8)
        assert stub.Prefill(prefill_request(other.wire_id(0), [1, 2, 3], alone), timeout=30).tokens == 3
    finally:
        other.free(0)
        other.close()


@pytest.mark.timeout(60)
def test_sigterm_exits_cleanly(launch: Callable[..., list[Pod]], tiny_folder: Path) -> None:
    (pod,) = launch(("prefill", tiny_folder, {"shutdown_grace_s": "2"}))
    stub = prefill_pb2_grpc.PrefillStub(grpc.insecure_channel(pod.address))
    assert stub.Stats(prefill_pb2.PrefillStatsRequest(), timeout=10).max_model_len == 256
    started = time.monotonic()
    pod.process.send_signal(signal.SIGTERM)
    assert pod.process.wait(10) == 0
    assert time.monotonic() - started < 5


# ---- the real model: greedy tokens equal transformers -----------------------------------------------
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def real_cluster(launch: Callable[..., list[Pod]], model_folder: Path) -> Cluster:
    return start_cluster(launch, model_folder)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", ["request", "head"])
def test_real_model_prefill_then_decode_equals_transformers(
    layout: str, model: LoadedModel, hf_reference_model: Any, real_cluster: Cluster
) -> None:
    tok = model.tokenizer
    long_text = (ROOT / "tests" / "data" / "alice_ch1.txt").read_text()[:1500]
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT]
    prompts.append(tok.encode(long_text + "\n\nWho is the story about?"))
    logits = remote_logits(model, real_cluster, layout, prompts, steps=NEW_TOKENS - 1)
    got = torch.stack([step.argmax(-1) for step in logits], dim=1).tolist()  # [B, NEW_TOKENS]
    for ids, tokens in zip(prompts, got, strict=True):
        x = torch.tensor([ids])
        out = hf_reference_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False
        )
        assert tokens == out[0, len(ids) :].tolist()
    expected = local_logits(model, prompts, steps=0)[0]
    torch.testing.assert_close(logits[0], expected, rtol=1e-3, atol=1e-3)
