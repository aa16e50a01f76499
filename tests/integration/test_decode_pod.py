"""The dense-decode pod as a real process, over real attention (and prefill) pods and real gRPC.

- Greedy tokens equal transformers' for request- and head-partitioned placements, 8 concurrent
  Generate calls, with the prompt prefilled by the decode pod itself or by a prefill pod; the
  streamed text equals the tokenizer's decoding.
- Bad requests get INVALID_ARGUMENT naming the field (a running request id: ALREADY_EXISTS), and
  the pod keeps serving.
- Cancelling (the client goes away, or Cancel{request_id}) frees the request's KV on its pods.
- An attention pod killed mid-generation ends only the requests placed on it, promptly, with
  UNAVAILABLE naming it; a request on another pod finishes with exactly its tokens.
- The pod registers in Redis; SIGTERM refuses new requests, ends the rest with UNAVAILABLE after
  the grace period, frees their KV, deregisters, and exits 0.

Every pod is a subprocess on a free port (`--port 0`) started once for the module and killed by a
finalizer.
"""

from __future__ import annotations

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

from services.core.model.load import LoadedModel
from services.core.placement import Placement, placement_to_proto
from services.core.redis_server import RedisServer
from services.core.registry import PodRegistry, RedisSettings, Role, connect
from services.proto import attention_pb2, attention_pb2_grpc, decode_pb2, decode_pb2_grpc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 24
LONG_TEXT = (Path(__file__).parent.parent / "data" / "alice_ch1.txt").read_text()[:1200]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]
RAW_PROMPTS = ["The quick brown fox", LONG_TEXT + "\n\nIn one sentence, what happened to Alice?"]


# ---- processes ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Pod:
    process: subprocess.Popen[str]
    address: str
    role: str

    def attention(self) -> attention_pb2_grpc.AttentionStub:
        return attention_pb2_grpc.AttentionStub(grpc.insecure_channel(self.address))

    def decode(self) -> decode_pb2_grpc.DecodeStub:
        return decode_pb2_grpc.DecodeStub(grpc.insecure_channel(self.address))


def start_pod(role: str, log: Path, env: dict[str, str], **settings: str) -> Pod:
    prefix = f"DISAGG_{role.upper()}_"
    env = {**os.environ, **env, f"{prefix}PORT": "0"}
    env.update({f"{prefix}{k.upper()}": v for k, v in settings.items()})
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{role}.server"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"{role} pod did not start: {line!r}\n{log.read_text()[-3000:]}")
    return Pod(process, line.rsplit(" ", 1)[1].strip(), role)


@dataclass(slots=True)
class Cluster:
    decode: Pod
    a: Pod  # attention pods
    b: Pod
    redis: RedisSettings
    launch: Callable[..., Pod]

    def stub(self) -> decode_pb2_grpc.DecodeStub:
        return self.decode.decode()


@pytest.fixture(scope="module")
def redis_module(redis_server: RedisServer) -> RedisSettings:
    return RedisSettings(url=redis_server.url, key_prefix=f"test-{uuid.uuid4().hex[:12]}:")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, model_folder: Path, redis_module: RedisSettings
) -> Iterator[Cluster]:
    pods: list[Pod] = []
    logs = tmp_path_factory.mktemp("pod-logs")
    redis_env = {"DISAGG_REDIS_URL": redis_module.url, "DISAGG_REDIS_KEY_PREFIX": redis_module.key_prefix}

    def launch(role: str, **settings: str) -> Pod:
        settings = {"model": str(model_folder), **settings}
        pods.append(start_pod(role, logs / f"{role}-{len(pods)}.log", redis_env, **settings))
        return pods[-1]

    try:
        a = launch("attention", kv_budget_bytes=str(64 << 20))
        b = launch("attention", kv_budget_bytes=str(64 << 20))
        decode = launch(
            "decode",
            max_num_seqs="16",
            max_num_batched_tokens="128",  # the long prompt is chunked and mixes with decode rows
            micro_batch_min_context="0",  # ping-pong (2 micro-batches) even for these short prompts
            shutdown_grace_s="2",
            layer_timeout_s="10",
        )
        yield Cluster(decode, a, b, redis_module, launch)
    finally:
        for pod in pods:
            if pod.process.poll() is None:
                pod.process.kill()
            pod.process.wait(10)


# ---- requests -----------------------------------------------------------------------------------
def request(
    request_id: str,
    prompt: list[int],
    placement: Placement,
    max_tokens: int = NEW_TOKENS,
    prefill_address: str = "",
    **sampling: Any,
) -> decode_pb2.GenerateRequest:
    params = {"temperature": 0.0, "top_p": 1.0, **sampling}
    message = decode_pb2.GenerateRequest(
        request_id=request_id,
        prompt_ids=prompt,
        sampling=decode_pb2.SamplingParams(max_tokens=max_tokens, **params),
        prefill_address=prefill_address,
    )
    placement_to_proto(placement, message.placement)
    return message


@dataclass(slots=True)
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str
    prefill_seconds: float


def generate(stub: decode_pb2_grpc.DecodeStub, message: decode_pb2.GenerateRequest) -> Result:
    responses = list(stub.Generate(message, timeout=120))
    return Result(
        [t for r in responses for t in r.token_ids],
        "".join(r.text for r in responses),
        responses[-1].finish_reason,
        responses[0].prefill_seconds,
    )


def blocks_used(pod: Pod) -> int:
    return int(pod.attention().Stats(attention_pb2.StatsRequest(), timeout=5).blocks_used)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def prompts(model: LoadedModel) -> list[list[int]]:
    tok = model.tokenizer
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT_PROMPTS] + [
        tok.encode(p) for p in RAW_PROMPTS
    ]


@pytest.fixture(scope="module")
def reference(hf_reference_model: Any, prompts: list[list[int]]) -> list[list[int]]:
    outputs = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = hf_reference_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False
        )
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def placements(cluster: Cluster, heads: int) -> list[Placement]:
    a, b = cluster.a.address, cluster.b.address
    return [
        Placement.request_partitioned(a, heads),
        Placement.request_partitioned(b, heads),
        Placement.head_partitioned([a, b], heads),
    ]


def run_concurrently(
    cluster: Cluster, model: LoadedModel, prompts: list[list[int]], prefill_address: str = ""
) -> list[tuple[int, Result]]:
    """8 concurrent Generate calls: prompt i % len(prompts), the three placements in turn."""
    layouts = placements(cluster, model.config.num_kv_heads)
    calls = [(i % len(prompts), layouts[i % len(layouts)]) for i in range(8)]
    results: list[tuple[int, Result] | None] = [None] * len(calls)
    stub = cluster.stub()
    tag = uuid.uuid4().hex[:8]

    def one(index: int) -> None:
        prompt, placement = calls[index]
        message = request(f"{tag}-{index}", prompts[prompt], placement, prefill_address=prefill_address)
        results[index] = (prompt, generate(stub, message))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert all(r is not None for r in results), "a Generate call failed; see the log above"
    return [r for r in results if r is not None]


# ---- exactness ------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_greedy_tokens_equal_transformers_with_local_prefill(
    cluster: Cluster, model: LoadedModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    for prompt, result in run_concurrently(cluster, model, prompts):
        assert result.token_ids == reference[prompt]
        assert result.text == model.tokenizer.decode(result.token_ids)
        assert result.finish_reason in ("stop", "length") and result.prefill_seconds == 0
    for layout in placements(cluster, model.config.num_kv_heads):  # one at a time, too
        assert (
            generate(cluster.stub(), request(f"one-{uuid.uuid4().hex[:8]}", prompts[0], layout)).token_ids
            == (reference[0])
        )
    assert blocks_used(cluster.a) == 0 and blocks_used(cluster.b) == 0


@pytest.mark.timeout(600)
def test_greedy_tokens_equal_transformers_with_a_prefill_pod(
    cluster: Cluster, model: LoadedModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    pytest.importorskip("services.prefill.server", reason="the prefill pod is not in this build")
    prefill = cluster.launch("prefill")
    for prompt, result in run_concurrently(cluster, model, prompts, prefill_address=prefill.address):
        assert result.token_ids == reference[prompt]
        assert result.text == model.tokenizer.decode(result.token_ids)
        assert result.prefill_seconds > 0
    one_token = generate(  # nothing to prefill: the decode pod runs the prompt itself
        cluster.stub(),
        request("one-token", prompts[0][:1], placements(cluster, 3)[2], prefill_address=prefill.address),
    )
    assert one_token.prefill_seconds == 0 and len(one_token.token_ids) == NEW_TOKENS
    assert blocks_used(cluster.a) == 0 and blocks_used(cluster.b) == 0
    dead_prefill = request(
        "no-prefill-pod", prompts[0], placements(cluster, 3)[0], prefill_address="127.0.0.1:1"
    )
    # An unreachable prefill pod is not the request's fault: the decode pod prefills it itself.
    assert generate(cluster.stub(), dead_prefill).token_ids == reference[0]
    assert wait_for(lambda: blocks_used(cluster.a) == 0) < 5


# ---- bad requests ---------------------------------------------------------------------------------
def test_bad_requests_get_invalid_argument_naming_the_field(cluster: Cluster, model: LoadedModel) -> None:
    stub, heads = cluster.stub(), model.config.num_kv_heads
    good = Placement.request_partitioned(cluster.a.address, heads)
    window = model.config.max_position_embeddings
    too_long = request("too-long", [1] * window, good)
    no_pods = request("no-pods", [1, 2], good)
    del no_pods.placement.entries[:]
    cases = [
        (request("bad id!", [1, 2], good), "request_id"),
        (request("", [1, 2], good), "request_id"),
        (request("empty", [], good), "prompt_ids is empty"),
        (request("vocab", [1, model.config.vocab_size], good), "outside the vocabulary"),
        (too_long, f"at most {window - 1} fit"),
        (request("zero", [1, 2], good, max_tokens=0), "max_tokens"),
        (request("temp", [1, 2], good, temperature=-1.0), "temperature"),
        (request("top-p", [1, 2], good, top_p=0.0), "top_p"),
        (request("heads", [1, 2], Placement.request_partitioned(cluster.a.address, heads - 1)), "placement"),
        (no_pods, "placement: a placement needs at least one attention pod"),
        (request("addr", [1, 2], Placement.request_partitioned("no-port", heads)), "not host:port"),
        (request("prefill", [1, 2], good, prefill_address="nowhere"), "prefill_address"),
    ]
    for message, needle in cases:
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, message)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (needle, info.value.details())
        assert needle in (info.value.details() or ""), (needle, info.value.details())
    unreachable = request("dead-pod", [1, 2], Placement.request_partitioned("127.0.0.1:1", heads))
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, unreachable)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "attention pod 127.0.0.1:1" in (info.value.details() or "")
    assert len(generate(stub, request("after-bad", [1, 2, 3], good, max_tokens=3)).token_ids) == 3


# ---- cancellation -----------------------------------------------------------------------------
def test_cancelling_frees_the_kv_and_cancel_by_id_works(cluster: Cluster, model: LoadedModel) -> None:
    stub, heads = cluster.stub(), model.config.num_kv_heads
    placement = Placement.head_partitioned([cluster.a.address, cluster.b.address], heads)
    # The client goes away mid-stream.
    walk_away = request("walk-away", [1, 2, 3, 4], placement, max_tokens=2000, ignore_eos=True)
    call = stub.Generate(walk_away, timeout=60)
    assert [len(next(call).token_ids) for _ in range(3)] == [1, 1, 1]
    assert blocks_used(cluster.a) > 0 and blocks_used(cluster.b) > 0
    call.cancel()
    wait_for(lambda: blocks_used(cluster.a) == 0 and blocks_used(cluster.b) == 0)
    # Cancel{request_id}; a second Generate with the same id meanwhile is refused.
    cancel_me = request("cancel-me", [1, 2, 3, 4], placement, max_tokens=2000, ignore_eos=True)
    call = stub.Generate(cancel_me, timeout=60)
    next(call)
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, request("cancel-me", [1, 2], placement))
    assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert stub.Cancel(decode_pb2.CancelRequest(request_id="cancel-me"), timeout=5).cancelled
    assert list(call)[-1].finish_reason == "abort"
    assert blocks_used(cluster.a) == 0 and blocks_used(cluster.b) == 0
    assert not stub.Cancel(decode_pb2.CancelRequest(request_id="cancel-me"), timeout=5).cancelled
    stats = stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)
    assert (stats.running, stats.waiting, stats.max_num_seqs) == (0, 0, 16) and stats.steps > 0


# ---- attention policies ---------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_requests_attention_policy_runs_on_its_attention_pods(
    cluster: Cluster, model: LoadedModel, prompts: list[list[int]]
) -> None:
    """Generate carries the policy to the pods' Open: the tokens are the colocated engine's with the
    same policy, and heavy_hitter's evictions free blocks on both pods while the request runs."""
    from services.core.attention import PolicyName, PolicySpec
    from services.decode.colocated import build_engine
    from services.decode.sampling import SamplingParams
    from services.decode.scheduler import SchedulerConfig

    spec = PolicySpec(PolicyName.HEAVY_HITTER, 0.2)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, attention_policy=spec)
    same_chunks = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128)  # as the decode pod's
    (expected,) = build_engine(model, scheduler=same_chunks).generate([prompts[-1]], params)
    heads = model.config.num_kv_heads
    both = Placement.head_partitioned([cluster.a.address, cluster.b.address], heads)
    message = request("heavy", prompts[-1], both)
    message.attention_policy.name, message.attention_policy.budget = "heavy_hitter", 0.2
    call = cluster.stub().Generate(message, timeout=120)
    tokens: list[int] = []
    while len(tokens) < 3:  # the first token ends the prefill; decode steps (and evictions) follow
        tokens += next(call).token_ids
    held = blocks_used(cluster.a) + blocks_used(cluster.b)
    dense_blocks = heads * -(-(len(prompts[-1]) + NEW_TOKENS) // 16)  # what a dense sequence holds
    assert held < 0.5 * dense_blocks
    tokens += [t for r in call for t in r.token_ids]
    assert tokens == expected.token_ids
    assert blocks_used(cluster.a) == 0 and blocks_used(cluster.b) == 0
    bad = request("bad-policy", [1, 2], Placement.request_partitioned(cluster.a.address, heads))
    bad.attention_policy.name = "streaming"
    with pytest.raises(grpc.RpcError) as info:
        generate(cluster.stub(), bad)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown attention policy 'streaming'" in (info.value.details() or "")


# ---- failures -------------------------------------------------------------------------------------
def test_a_killed_attention_pod_ends_only_its_requests(
    cluster: Cluster, model: LoadedModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    stub, heads = cluster.stub(), model.config.num_kv_heads
    doomed_pod = cluster.launch("attention", kv_budget_bytes=str(16 << 20))
    doomed = stub.Generate(
        request(
            "on-doomed-pod",
            prompts[1],
            Placement.head_partitioned([cluster.a.address, doomed_pod.address], heads),
            max_tokens=2000,
            ignore_eos=True,
        ),
        timeout=120,
    )
    next(doomed)
    on_a = Placement.request_partitioned(cluster.a.address, heads)
    survivor = stub.Generate(request("on-pod-a", prompts[0], on_a), timeout=120)
    tokens = list(next(survivor).token_ids)  # both are in the running batch now
    doomed_pod.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for _ in doomed:
            pass
    assert time.monotonic() - killed_at < 5
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert f"attention pod {doomed_pod.address}" in (info.value.details() or "")
    tokens += [t for r in survivor for t in r.token_ids]
    assert tokens == reference[0]
    assert wait_for(lambda: blocks_used(cluster.a) == 0) < 5  # the doomed request's heads on pod a too


# ---- registration and shutdown ----------------------------------------------------------------
def test_the_pod_registers_in_redis(cluster: Cluster) -> None:
    registry = PodRegistry(connect(cluster.redis), cluster.redis)
    (status,) = registry.live_pods(Role.DECODE)
    assert status.info.address == cluster.decode.address and status.info.capacity is not None


@pytest.mark.timeout(120)
def test_sigterm_refuses_new_requests_ends_the_rest_and_exits_zero(
    cluster: Cluster, model: LoadedModel
) -> None:
    """Last in the module: it stops the module's decode pod."""
    stub, heads = cluster.stub(), model.config.num_kv_heads
    placement = Placement.request_partitioned(cluster.b.address, heads)
    long_run = request("in-flight", [1, 2, 3], placement, max_tokens=5000, ignore_eos=True)
    in_flight = stub.Generate(long_run, timeout=60)
    next(in_flight)
    started = time.monotonic()
    cluster.decode.process.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            generate(stub, request(f"late-{uuid.uuid4().hex[:6]}", [1, 2], placement, max_tokens=1))
        except grpc.RpcError as exc:
            return exc.code() is grpc.StatusCode.UNAVAILABLE and "shutting down" in (exc.details() or "")
        return False

    wait_for(refused, timeout_s=5)
    with pytest.raises(grpc.RpcError) as info:
        for _ in in_flight:
            pass
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert cluster.decode.process.wait(10) == 0
    assert time.monotonic() - started < 8  # grace 2 s
    assert blocks_used(cluster.b) == 0
    assert PodRegistry(connect(cluster.redis), cluster.redis).live_pods(Role.DECODE) == []
