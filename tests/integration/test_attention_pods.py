"""Attention pods as real processes over real gRPC.

- RemoteAttention equals LocalAttention for request-partitioned, head-partitioned and mixed
  placements (a tiny model geometry: only config.json matters to a pod), and the engine on two pods
  generates exactly the colocated engine's greedy tokens with the real model (slow).
- Malformed Step frames get INVALID_ARGUMENT naming the problem, and the pod keeps serving.
- A pod killed (SIGKILL) or hung (SIGSTOP) makes `attend` raise AttentionPodError within seconds;
  SIGTERM ends open streams with UNAVAILABLE and the pod exits cleanly.

Every pod is a subprocess on a free port (`--port 0`), killed by a finalizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention
from services.core.attention import AttentionStep, OutOfBlocks, PolicyName, PolicySpec, Reserved, SeqChunk
from services.core.model.config import ModelConfig
from services.core.model.load import LoadedModel
from services.core.placement import Placement, PlacementEntry
from services.core.transport.step_socket import (
    HEADER,
    LAYER_HEADER,
    ConnectionClosed,
    FrameKind,
    configure,
    parse_error,
    recv_frame,
)
from services.core.wire import TensorLimits, decode, encode, encode_into
from services.decode.attention_link import StepTransport
from services.decode.colocated import build_engine
from services.decode.engine import Engine
from services.decode.remote_attention import AttentionPodError, RemoteAttention, RemoteAttentionOptions
from services.decode.sampling import SamplingParams
from services.decode.scheduler import SchedulerConfig
from services.proto import attention_pb2 as pb
from services.proto import attention_pb2_grpc as pb_grpc
from services.proto import tensor_pb2

ROOT = Path(__file__).resolve().parents[2]
TINY = {  # 3 layers, 3 KV heads, G = 2, D = 5
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 30,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "max_position_embeddings": 4096,
}
FAST = RemoteAttentionOptions(rpc_timeout_s=5, connect_timeout_s=30, layer_timeout_s=5)


@dataclass(slots=True)
class Pod:
    process: subprocess.Popen[str]
    address: str

    def stub(self) -> pb_grpc.AttentionStub:
        return pb_grpc.AttentionStub(grpc.insecure_channel(self.address))


def start_pod(model: Path, log: Path, **settings: str) -> Pod:
    env = {**os.environ, "DISAGG_ATTENTION_MODEL": str(model), "DISAGG_ATTENTION_PORT": "0"}
    env.update({f"DISAGG_ATTENTION_{k.upper()}": v for k, v in settings.items()})
    process = subprocess.Popen(
        [sys.executable, "-m", "services.attention.server"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 60)
    line = process.stdout.readline() if ready else ""
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"attention pod did not start: {line!r}\n{log.read_text()[-2000:]}")
    return Pod(process, line.rsplit(" ", 1)[1].strip())


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Pod]]:
    """Start pods for this module; every one is killed at the end, whatever happened."""
    pods: list[Pod] = []
    logs = tmp_path_factory.mktemp("pod-logs")

    def _launch(model: Path, **settings: str) -> Pod:
        pods.append(start_pod(model, logs / f"pod-{len(pods)}.log", **settings))
        return pods[-1]

    yield _launch
    for pod in pods:
        if pod.process.poll() is None:
            pod.process.kill()
        pod.process.wait(10)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose config.json is all a pod reads (the other files only need to exist)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    (folder / "config.json").write_text(json.dumps(TINY))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def tiny_pods(launch: Callable[..., Pod], tiny_model: Path) -> tuple[Pod, Pod]:
    return launch(tiny_model, kv_budget_bytes="2000000"), launch(tiny_model, kv_budget_bytes="2000000")


# ---- RemoteAttention over pods with the tiny geometry -----------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("prompts_here", [True, False], ids=["prompts-here", "prompts-on-pods"])
@pytest.mark.parametrize("transport", list(StepTransport))
def test_remote_equals_local_for_every_placement(
    tiny_pods: tuple[Pod, Pod], tiny_model: Path, transport: StepTransport, prompts_here: bool
) -> None:
    """Both carriers of the Step frames (the pods' Step socket and the gRPC stream) give exactly
    what local attention gives, whether prompts' first chunks are attended here (kv_only on the
    pods, the default) or on the pods; later chunks and decode rows attend what kv_only stored."""
    a, b = (p.address for p in tiny_pods)
    cfg = ModelConfig.from_folder(tiny_model)
    placements = {
        0: Placement.request_partitioned(a, 3),
        1: Placement.head_partitioned([a, b], 3),  # a: heads 0-1, b: head 2
        2: Placement((PlacementEntry(b, 0, 1), PlacementEntry(a, 1, 2))),  # a holds another slice
    }
    options = dataclasses.replace(FAST, step_transport=transport, local_prompt_attention=prompts_here)
    remote = RemoteAttention(cfg, torch.float32, placements.__getitem__, options)
    local = LocalAttention(KVPool(KVPoolConfig(cfg.num_layers, cfg.head_dim), 500), 3, 6)
    torch.manual_seed(0)
    steps = [[SeqChunk(0, 0, 5), SeqChunk(1, 0, 20), SeqChunk(2, 0, 1)]]
    steps += [[SeqChunk(0, 5 + t, 1), SeqChunk(1, 20, 7), SeqChunk(2, 1 + t, 1)] for t in range(1)]
    steps += [[SeqChunk(s, start + t, 1) for s, start in ((0, 6), (1, 27), (2, 2))] for t in range(20)]
    try:
        for part in (remote, local):
            for seq in placements:
                part.open(seq)
        for chunks in steps:
            n = sum(c.length for c in chunks)
            inputs = [(torch.randn(n, 6, 5), torch.randn(n, 3, 5), torch.randn(n, 3, 5)) for _ in range(3)]
            outputs = []
            for part in (remote, local):
                for c in chunks:
                    assert isinstance(part.reserve(c.seq_id, c.end), Reserved)
                step = part.begin(chunks)
                outputs.append([step.attend(layer, *inputs[layer]) for layer in range(3)])
            for got, expected in zip(*outputs, strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        for seq in placements:
            remote.free(seq)
        remote.close()
    for pod in tiny_pods:
        stats = pod.stub().Stats(pb.StatsRequest(), timeout=5)
        assert stats.blocks_free == stats.blocks_total and stats.sequences == 0


@pytest.mark.timeout(120)
def test_steps_in_flight_together_equal_local(tiny_pods: tuple[Pod, Pod], tiny_model: Path) -> None:
    """Ping-pong: two steps (micro-batches) submitted layer by layer, interleaved on the same pods'
    streams, collected in submission order, give what local attention gives."""
    a, b = (p.address for p in tiny_pods)
    cfg = ModelConfig.from_folder(tiny_model)
    placements = {
        s: Placement.head_partitioned([a, b], 3) if s % 2 else Placement.request_partitioned(b, 3)
        for s in range(4)
    }
    remote = RemoteAttention(cfg, torch.float32, placements.__getitem__, FAST)
    local = LocalAttention(KVPool(KVPoolConfig(cfg.num_layers, cfg.head_dim), 500), 3, 6)
    groups = [[SeqChunk(0, 0, 4), SeqChunk(1, 0, 9)], [SeqChunk(2, 0, 1), SeqChunk(3, 0, 6)]]
    torch.manual_seed(1)
    inputs = [
        [(torch.randn(n, 6, 5), torch.randn(n, 3, 5), torch.randn(n, 3, 5)) for _ in range(3)]
        for n in (sum(c.length for c in g) for g in groups)
    ]
    try:
        outputs = []
        for part in (remote, local):
            for seq in placements:
                part.open(seq)
                assert isinstance(part.reserve(seq, 16), Reserved)
            steps = [part.begin(g) for g in groups]
            pending = [step.submit(0, *inputs[i][0]) for i, step in enumerate(steps)]
            got: list[list[torch.Tensor]] = [[], []]
            for layer in range(1, 3):
                for i, step in enumerate(steps):
                    got[i].append(pending[i]())
                    pending[i] = step.submit(layer, *inputs[i][layer])
            for i in range(2):
                got[i].append(pending[i]())
            outputs.append(got)
        for got, expected in zip(*outputs, strict=True):
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    finally:
        for seq in placements:
            remote.free(seq)
        remote.close()


@pytest.mark.timeout(60)
def test_reserve_is_all_or_nothing_across_pods(tiny_pods: tuple[Pod, Pod], tiny_model: Path) -> None:
    a, b = tiny_pods
    cfg = ModelConfig.from_folder(tiny_model)
    remote = RemoteAttention(cfg, torch.float32, Placement.head_partitioned([a.address, b.address], 3), FAST)
    total = b.stub().Stats(pb.StatsRequest(), timeout=5).blocks_total
    try:
        remote.open(0)
        # Pod a holds 2 heads and runs out; pod b (1 head) could give its share but must not keep it.
        result = remote.reserve(0, 16 * (total // 2 + 1))
        assert isinstance(result, OutOfBlocks)
        assert b.stub().Stats(pb.StatsRequest(), timeout=5).blocks_free == total
        assert isinstance(remote.reserve(0, 40), Reserved)  # the sequence is still usable
    finally:
        remote.free(0)
        remote.close()


@pytest.mark.timeout(60)
def test_imported_kv_is_attended_like_computed_kv(tiny_pods: tuple[Pod, Pod], tiny_model: Path) -> None:
    """A prefill pod's ImportKV stream (one message per layer) then decode steps on the pod."""
    cfg = ModelConfig.from_folder(tiny_model)
    a, b = tiny_pods
    placement = Placement.head_partitioned([a.address, b.address], 3)
    remote = RemoteAttention(cfg, torch.float32, placement, FAST, id_namespace=0)  # wire id == seq id
    local = LocalAttention(KVPool(KVPoolConfig(cfg.num_layers, cfg.head_dim), 100), 3, 6)
    torch.manual_seed(2)
    history = [(torch.randn(9, 3, 5), torch.randn(9, 3, 5)) for _ in range(3)]  # [T, Hkv, D] per layer
    try:
        for part in (remote, local):
            part.open(5)
            part.reserve(5, 10)
        prefill = local.begin([SeqChunk(5, 0, 9)])
        for layer, (k, v) in enumerate(history):
            prefill.attend(layer, torch.randn(9, 6, 5), k, v)
        for entry in placement.entries:
            heads = slice(entry.kv_head_start, entry.kv_head_end)
            chunks = [
                pb.ImportKVChunk(seq_id=5, layer=layer, start=0, k=encode(k[:, heads]), v=encode(v[:, heads]))
                for layer, (k, v) in enumerate(history)
            ]
            stub = a.stub() if entry.address == a.address else b.stub()
            assert stub.ImportKV(iter(chunks), timeout=5).chunks == 3
        steps = [part.begin([SeqChunk(5, 9, 1)]) for part in (remote, local)]
        for layer in range(3):
            q, k, v = torch.randn(1, 6, 5), torch.randn(1, 3, 5), torch.randn(1, 3, 5)
            got, expected = (step.attend(layer, q, k, v) for step in steps)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        remote.free(5)
        remote.close()


@pytest.mark.timeout(120)
def test_policies_on_pods_equal_local_and_evictions_free_pod_blocks(
    tiny_pods: tuple[Pod, Pod], tiny_model: Path
) -> None:
    """Each sequence's policy travels in Open: pods attend as LocalAttention with the same policies
    does, and heavy_hitter, head-partitioned over both pods, frees the same blocks on each."""
    a, b = (p.address for p in tiny_pods)
    cfg = ModelConfig.from_folder(tiny_model)
    specs = {
        0: (Placement.head_partitioned([a, b], 3), PolicySpec(PolicyName.HEAVY_HITTER, 0.2)),
        1: (Placement.request_partitioned(a, 3), PolicySpec(PolicyName.SPARQ, 0.25)),
        2: (Placement.request_partitioned(b, 3), PolicySpec(PolicyName.QUEST, 0.3)),
        3: (Placement.request_partitioned(a, 3), PolicySpec(PolicyName.SINK_WINDOW, 0.2)),
    }
    remote = RemoteAttention(cfg, torch.float32, lambda seq: specs[seq][0], FAST)
    local = LocalAttention(KVPool(KVPoolConfig(cfg.num_layers, cfg.head_dim), 1000), 3, 6)
    torch.manual_seed(3)
    steps = [[SeqChunk(s, 0, 150) for s in specs]]
    steps += [[SeqChunk(s, 150 + t, 1) for s in specs] for t in range(40)]
    try:
        for part in (remote, local):
            for seq, (_, spec) in specs.items():
                part.open(seq, spec)
                assert isinstance(part.reserve(seq, 200), Reserved)
        for chunks in steps:
            n = sum(c.length for c in chunks)
            inputs = [(torch.randn(n, 6, 5), torch.randn(n, 3, 5), torch.randn(n, 3, 5)) for _ in range(3)]
            outputs = []
            for part in (remote, local):
                step = part.begin(chunks)
                outputs.append([step.attend(layer, *inputs[layer]) for layer in range(3)])
            for got, expected in zip(*outputs, strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        allocator = local.pool.allocator
        per_lane = {seq: len(allocator.block_table(seq)[0]) for seq in specs}
        assert allocator.dropped(0) > 0 and per_lane[0] < per_lane[1]  # heavy_hitter evicted locally
        used = [pod.stub().Stats(pb.StatsRequest(), timeout=5).blocks_used for pod in tiny_pods]
        # Pod a holds heads 0-1 of sequence 0 and all of 1 and 3; pod b head 2 of 0 and all of 2.
        assert used == [2 * per_lane[0] + 3 * per_lane[1] + 3 * per_lane[3], per_lane[0] + 3 * per_lane[2]]
    finally:
        for seq in specs:
            remote.free(seq)
        remote.close()
    stub = tiny_pods[0].stub()
    for request, needle in [
        (pb.OpenRequest(seq_id=90, kv_head_count=1, policy="magic"), "dense, sink_window, heavy_hitter"),
        (pb.OpenRequest(seq_id=91, kv_head_count=1, policy="sparq", budget=0), "must be a number > 0"),
        (pb.OpenRequest(seq_id=92, kv_head_count=1, policy="heavy_hitter", scoring="lru"), "h2o, vatp"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Open(request, timeout=5)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()
    for pod in tiny_pods:
        stats = pod.stub().Stats(pb.StatsRequest(), timeout=5)
        assert stats.blocks_free == stats.blocks_total and stats.sequences == 0


# ---- bad frames on the Step stream --------------------------------------------------------------
def _layer(step_id: int, q: tensor_pb2.Tensor, k: torch.Tensor, v: torch.Tensor) -> pb.StepRequest:
    frame = pb.StepRequest(layer=pb.StepLayer(step_id=step_id, layer=0))
    frame.layer.q.CopyFrom(q)
    encode_into(frame.layer.k_new, k)
    encode_into(frame.layer.v_new, v)
    return frame


def _step(stub: pb_grpc.AttentionStub, seq_id: int, layers: list[pb.StepRequest]) -> list[pb.StepResponse]:
    begin = pb.StepRequest(begin=pb.StepBegin(step_id=0, chunks=[pb.StepChunk(seq_id=seq_id, length=2)]))
    return list(stub.Step(iter([begin, *layers]), timeout=10))


@pytest.mark.timeout(60)
def test_malformed_frames_get_invalid_argument_and_the_pod_keeps_serving(tiny_pods: tuple[Pod, Pod]) -> None:
    stub = tiny_pods[0].stub()
    stub.Open(pb.OpenRequest(seq_id=77, kv_head_start=0, kv_head_count=1, policy="dense"), timeout=5)
    stub.Reserve(pb.ReserveRequest(seq_id=77, num_tokens=2), timeout=5)
    k = v = torch.zeros(2, 5)  # 2 lanes: 2 tokens x 1 head
    good_q = encode(torch.zeros(2, 2, 5))
    short = tensor_pb2.Tensor(dtype=good_q.dtype, shape=good_q.shape, data=good_q.data[:-4])
    huge = tensor_pb2.Tensor(dtype=good_q.dtype, shape=[1 << 40, 2, 5], data=good_q.data)
    cases = [
        (short, "q: data holds 76 bytes but shape [2, 2, 5]"),
        (huge, "over the limit of 67108864 bytes"),
        (encode(torch.zeros(3000, 2, 5)), "differs from the expected [2, 2, 5]"),
        (encode(torch.zeros(2, 2, 5, dtype=torch.float16)), "dtype torch.float16"),
    ]
    for q, needle in cases:
        with pytest.raises(grpc.RpcError) as info:
            _step(stub, 77, [_layer(0, q, k, v)])
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert needle in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # a frame for a step that was never begun
        list(stub.Step(iter([_layer(9, good_q, k, v)]), timeout=10))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "step 9" in info.value.details()
    layers = [_layer(0, good_q, k, v)]
    for layer in (1, 2):
        layers.append(_layer(0, good_q, k, v))
        layers[-1].layer.layer = layer
    assert [r.layer for r in _step(stub, 77, layers)] == [0, 1, 2]  # still serving
    stub.Free(pb.FreeRequest(seq_id=77), timeout=5)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(tiny_pods[0].address))
    status = health.Check(health_pb2.HealthCheckRequest(service="disagg.v1.Attention"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def _socket(pod: Pod) -> socket.socket:
    port = pod.stub().Stats(pb.StatsRequest(), timeout=5).step_port
    assert port, "the pod offers no Step socket"
    sock = socket.create_connection((pod.address.rsplit(":", 1)[0], port), timeout=10)
    return configure(sock)


def _exchange(pod: Pod, frames: list[bytes], answers: int | None = None) -> list[tuple[FrameKind, bytes]]:
    """Send raw frames on a fresh connection; the first `answers` frames that come back (None: every
    frame that came back before the pod closed it)."""
    with _socket(pod) as sock:
        for frame in frames:
            sock.sendall(frame)
        got: list[tuple[FrameKind, bytes]] = []
        with contextlib.suppress(ConnectionClosed):
            while answers is None or len(got) < answers:
                got.append(recv_frame(sock, 1 << 26))
    return got


def _message(frame: pb.StepRequest) -> bytes:
    payload = frame.SerializeToString()
    return HEADER.pack(FrameKind.MESSAGE, len(payload)) + payload


@pytest.mark.timeout(60)
def test_step_socket_answers_bad_frames_with_an_error_frame_and_keeps_serving(
    tiny_pods: tuple[Pod, Pod],
) -> None:
    """The Step socket carries the same checks as the gRPC stream; a bad frame ends its connection
    with an ERROR frame naming the status and the problem, never the pod."""
    pod = tiny_pods[0]
    stub = pod.stub()
    stub.Open(pb.OpenRequest(seq_id=78, kv_head_start=0, kv_head_count=1, policy="dense"), timeout=5)
    stub.Reserve(pb.ReserveRequest(seq_id=78, num_tokens=2), timeout=5)
    k = v = torch.zeros(2, 5)
    good_q = encode(torch.zeros(2, 2, 5))
    begin = pb.StepRequest(begin=pb.StepBegin(step_id=0, chunks=[pb.StepChunk(seq_id=78, length=2)]))
    short = tensor_pb2.Tensor(dtype=good_q.dtype, shape=good_q.shape, data=good_q.data[:-4])
    cases = [
        ([HEADER.pack(7, 0)], "INVALID_ARGUMENT", "unknown frame kind 7"),
        ([HEADER.pack(FrameKind.MESSAGE, 1 << 30)], "INVALID_ARGUMENT", "over the limit"),
        ([HEADER.pack(FrameKind.MESSAGE, 3) + b"\xff\xff\xff"], "INVALID_ARGUMENT", "malformed Step frame"),
        ([_message(begin), _message(_layer(0, short, k, v))], "INVALID_ARGUMENT", "q: data holds 76 bytes"),
        ([_message(_layer(9, good_q, k, v))], "INVALID_ARGUMENT", "step 9"),
    ]
    for frames, status, needle in cases:
        ((kind, payload),) = _exchange(pod, frames)
        assert kind is FrameKind.ERROR
        got_status, message = parse_error(payload)
        assert got_status == status and needle in message, (got_status, message)
    # Still serving, on the socket and through the real client.
    with _socket(pod) as sock:
        sock.sendall(_message(begin) + _message(_layer(0, good_q, k, v)))
        kind, payload = recv_frame(sock, 1 << 26)
    assert kind is FrameKind.MESSAGE and pb.StepResponse.FromString(payload).layer == 0
    stub.Free(pb.FreeRequest(seq_id=78), timeout=5)


def _raw(step_id: int, lanes: int, body: bytes, kind: FrameKind = FrameKind.LAYER) -> bytes:
    """A raw LAYER frame (layer 0) as the decode pod sends it: headers, then q | k_new | v_new bytes."""
    payload = LAYER_HEADER.pack(step_id, 0, lanes) + body
    return HEADER.pack(kind, len(payload)) + payload


@pytest.mark.timeout(60)
def test_raw_layer_frames_are_checked_before_reading_and_equal_the_protobuf_answer(
    tiny_pods: tuple[Pod, Pod],
) -> None:
    """A raw LAYER frame (the decode pod's default) is answered with an OUTPUT frame holding exactly
    the o a protobuf layer frame gets; one with the wrong step, lanes or length, or a kind a client
    does not send, ends its connection with INVALID_ARGUMENT naming the problem."""
    pod = tiny_pods[1]
    stub = pod.stub()
    stub.Open(pb.OpenRequest(seq_id=79, kv_head_start=0, kv_head_count=1, policy="dense"), timeout=5)
    stub.Reserve(pb.ReserveRequest(seq_id=79, num_tokens=2), timeout=5)
    begin = _message(
        pb.StepRequest(begin=pb.StepBegin(step_id=0, chunks=[pb.StepChunk(seq_id=79, length=2)]))
    )
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 2, 5), torch.randn(2, 5), torch.randn(2, 5)  # 2 lanes, G = 2, D = 5
    body = b"".join(t.numpy().tobytes() for t in (q, k, v))
    cases = [
        ([begin, _raw(0, 3, body)], "carries 3 lanes; the step has 2"),
        (
            [begin, _raw(0, 2, body[:-4])],
            "the frame holds 156 tensor bytes, but q of 2 lanes and k_new, v_new of 2 take 160",
        ),
        ([begin, HEADER.pack(FrameKind.LAYER, 8) + bytes(8)], "shorter than its 16-byte header"),
        ([_raw(9, 2, body)], "step 9"),
        ([begin, _raw(0, 2, body, FrameKind.OUTPUT)], "MESSAGE or LAYER frames, not OUTPUT"),
    ]
    for frames, needle in cases:
        ((kind, payload),) = _exchange(pod, frames)
        assert kind is FrameKind.ERROR
        status, message = parse_error(payload)
        assert status == "INVALID_ARGUMENT" and needle in message, (status, message)
    # The same layer as a protobuf frame and as a raw frame (each writes the same K/V, then attends).
    ((kind, payload),) = _exchange(pod, [begin, _message(_layer(0, encode(q), k, v))], answers=1)
    expected = decode(pb.StepResponse.FromString(payload).o, TensorLimits(max_bytes=1 << 20))
    ((kind, payload),) = _exchange(pod, [begin, _raw(0, 2, body)], answers=1)
    assert kind is FrameKind.OUTPUT
    assert LAYER_HEADER.unpack(payload[: LAYER_HEADER.size]) == (0, 0, 2)
    got = torch.frombuffer(bytearray(payload[LAYER_HEADER.size :]), dtype=torch.float32).view(2, 2, 5)
    assert torch.equal(got, expected)
    # kv_only: the frame carries k and v of 2 lanes and no q; the answer has 0 lanes, and a frame
    # that still carries q is refused by its length.
    kv_chunk = pb.StepChunk(seq_id=79, length=2, kv_only=True)
    kv_begin = _message(pb.StepRequest(begin=pb.StepBegin(step_id=0, chunks=[kv_chunk])))
    kv_body = b"".join(t.numpy().tobytes() for t in (k, v))
    ((kind, payload),) = _exchange(pod, [kv_begin, _raw(0, 2, body)])
    assert kind is FrameKind.ERROR
    assert "holds 160 tensor bytes, but q of 0 lanes and k_new, v_new of 2 take 80" in payload.decode()
    ((kind, payload),) = _exchange(pod, [kv_begin, _raw(0, 2, kv_body)], answers=1)
    assert kind is FrameKind.OUTPUT and payload == LAYER_HEADER.pack(0, 0, 0)
    stub.Free(pb.FreeRequest(seq_id=79), timeout=5)


# ---- failures -------------------------------------------------------------------------------------
def _remote_mid_step(
    pod: Pod, tiny_model: Path, layer_timeout_s: float = 5, transport: StepTransport = StepTransport.TCP
) -> tuple[RemoteAttention, AttentionStep]:
    cfg = ModelConfig.from_folder(tiny_model)
    options = RemoteAttentionOptions(
        rpc_timeout_s=5, layer_timeout_s=layer_timeout_s, step_transport=transport
    )
    remote = RemoteAttention(cfg, torch.float32, Placement.request_partitioned(pod.address, 3), options)
    remote.open(0)
    remote.reserve(0, 4)
    step = remote.begin([SeqChunk(0, 0, 4)])
    step.attend(0, torch.randn(4, 6, 5), torch.randn(4, 3, 5), torch.randn(4, 3, 5))
    return remote, step


def _next_layer_fails(step: AttentionStep, within_s: float) -> AttentionPodError:
    started = time.monotonic()
    with pytest.raises(AttentionPodError) as info:
        step.attend(1, torch.randn(4, 6, 5), torch.randn(4, 3, 5), torch.randn(4, 3, 5))
    assert time.monotonic() - started < within_s
    return info.value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", list(StepTransport))
def test_killed_pod_makes_attend_fail_promptly(
    launch: Callable[..., Pod], tiny_model: Path, transport: StepTransport
) -> None:
    pod = launch(tiny_model, kv_budget_bytes="1000000")
    remote, step = _remote_mid_step(pod, tiny_model, transport=transport)
    pod.process.send_signal(signal.SIGKILL)
    pod.process.wait(10)
    error = _next_layer_fails(step, within_s=3)
    assert pod.address in str(error) and error.code is grpc.StatusCode.UNAVAILABLE
    remote.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", list(StepTransport))
def test_hung_pod_makes_attend_fail_after_the_layer_timeout(
    launch: Callable[..., Pod], tiny_model: Path, transport: StepTransport
) -> None:
    """The socket's timeout (tcp) or the watchdog (grpc) turns a hung pod into an error."""
    pod = launch(tiny_model, kv_budget_bytes="1000000")
    remote, step = _remote_mid_step(pod, tiny_model, layer_timeout_s=1, transport=transport)
    pod.process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10  # a loaded machine can take a moment to stop every thread
    while Path(f"/proc/{pod.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "the pod did not stop"
        time.sleep(0.01)
    try:
        assert "no answer within 1 s" in str(_next_layer_fails(step, within_s=3))
    finally:
        pod.process.kill()
        remote.close()


@pytest.mark.timeout(60)
def test_sigterm_ends_open_streams_with_unavailable_and_exits(
    launch: Callable[..., Pod], tiny_model: Path
) -> None:
    pod = launch(tiny_model, kv_budget_bytes="1000000", shutdown_grace_s="1")
    remote, step = _remote_mid_step(pod, tiny_model)
    started = time.monotonic()
    pod.process.send_signal(signal.SIGTERM)
    assert pod.process.wait(10) == 0
    assert time.monotonic() - started < 5
    assert _next_layer_fails(step, within_s=3).code is grpc.StatusCode.UNAVAILABLE
    remote.close()


# ---- the real model: engine on pods == colocated engine ---------------------------------------
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Name a large mammal.",
    "Say hello in Spanish.",
    "What colour is the sky?",
]
SCHEDULER = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=40)  # prefill chunks mix with decode
PARAMS = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def prompt_ids(model: LoadedModel) -> list[list[int]]:
    return [model.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="module")
def colocated_tokens(model: LoadedModel, prompt_ids: list[list[int]]) -> list[list[int]]:
    engine = build_engine(model, kv_budget_bytes=64 << 20, scheduler=SCHEDULER)
    return [c.token_ids for c in engine.generate(prompt_ids, PARAMS)]


@pytest.fixture(scope="module")
def real_pods(launch: Callable[..., Pod], model_folder: Path) -> tuple[Pod, Pod]:
    budget = str(64 << 20)
    return launch(model_folder, kv_budget_bytes=budget), launch(model_folder, kv_budget_bytes=budget)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("layout", "micro_batches"), [("request", 1), ("head", 1), ("head", 2), ("request", 3), ("alternate", 2)]
)
def test_engine_on_pods_generates_the_colocated_tokens(
    layout: str,
    micro_batches: int,
    model: LoadedModel,
    prompt_ids: list[list[int]],
    colocated_tokens: list[list[int]],
    real_pods: tuple[Pod, Pod],
) -> None:
    a, b = (p.address for p in real_pods)
    heads = model.config.num_kv_heads
    placements = {
        "request": Placement.request_partitioned(a, heads),
        "head": Placement.head_partitioned([a, b], heads),
    }
    # "alternate": request placement over both pods, so micro-batches are reordered to follow pods.
    placement = placements.get(layout) or (
        lambda seq_id: Placement.request_partitioned(a if seq_id % 2 else b, heads)
    )
    attention = RemoteAttention(model.config, model.dense.dtype, placement)
    try:
        engine = Engine(model.dense, attention, model.tokenizer, SCHEDULER, micro_batches)
        remote_tokens = [c.token_ids for c in engine.generate(prompt_ids, PARAMS)]
    finally:
        attention.close()
    assert remote_tokens == colocated_tokens
    for pod in real_pods:
        stats = pod.stub().Stats(pb.StatsRequest(), timeout=5)
        assert stats.sequences == 0 and stats.blocks_free == stats.blocks_total
