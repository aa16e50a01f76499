"""Raw tensor frames of the Step socket (services/core/transport/step_socket.py) over real sockets:
they arrive bit for bit (any size, bf16 too), and the decode side's reader rejects an answer that
is not the one it waits for (wrong step, wrong shape, an ERROR frame, an oversized frame) with an
AttentionPodError naming the problem, before reading any tensor bytes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch

from services.core.transport.step_socket import (
    HEADER,
    LAYER_HEADER,
    FrameKind,
    recv_header,
    recv_layer_header,
    recv_tensor,
    send_error,
    send_tensors,
)
from services.decode.attention_link import AttentionPodError, RemoteAttentionOptions, SocketStepStream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_frame_arrives_bit_for_bit_even_when_larger_than_socket_buffers(dtype: torch.dtype) -> None:
    a, b = socket.socketpair()
    tensors = [torch.randn(700, 9, 64).to(dtype), torch.randn(700, 64).to(dtype)[:, :32]]  # 2nd: strided
    expected = torch.cat([t.reshape(-1) for t in tensors])
    sent: list[int] = []
    writer = threading.Thread(
        target=lambda: sent.append(send_tensors(a, FrameKind.LAYER, 7, 3, 700, tensors))
    )
    writer.start()  # ~2.5 MB: sendmsg returns partial counts and the rest follows
    kind, length = recv_header(b, 1 << 26)
    assert (kind, recv_layer_header(b, length)) == (FrameKind.LAYER, (7, 3, 700))
    got = recv_tensor(b, expected.numel(), dtype)
    writer.join(10)
    assert torch.equal(got, expected) and sent == [expected.numel() * expected.element_size()]
    assert length == LAYER_HEADER.size + sent[0]
    a.close()
    b.close()


@contextmanager
def stream_and_peer() -> Iterator[tuple[SocketStepStream, socket.socket]]:
    """A decode-side stream connected to a plain listening socket playing the pod."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        stream = SocketStepStream(
            "127.0.0.1:1", listener.getsockname()[1], RemoteAttentionOptions(max_message_bytes=1 << 20)
        )
        peer, _ = listener.accept()
        try:
            yield stream, peer
        finally:
            stream.close()
            peer.close()


SHAPE = (4, 3, 8)  # o: 4 lanes, G = 3, D = 8


def test_the_expected_output_frame_is_read_into_a_tensor() -> None:
    o = torch.randn(*SHAPE)
    with stream_and_peer() as (stream, peer):
        send_tensors(peer, FrameKind.OUTPUT, 5, 2, 4, [o])
        assert torch.equal(stream.receive_output(5, 2, SHAPE, torch.float32, timeout_s=5), o)


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (
            HEADER.pack(FrameKind.OUTPUT, 16 + 384) + LAYER_HEADER.pack(6, 2, 4) + bytes(384),
            "answered step 6 layer 2, expected step 5 layer 2",
        ),
        (
            HEADER.pack(FrameKind.OUTPUT, 16 + 384) + LAYER_HEADER.pack(5, 2, 3) + bytes(384),
            "o of 3 lanes in 384 bytes, expected [4, 3, 8]",
        ),
        (
            HEADER.pack(FrameKind.OUTPUT, 16 + 380) + LAYER_HEADER.pack(5, 2, 4) + bytes(380),
            "o of 4 lanes in 380 bytes",
        ),
        (HEADER.pack(FrameKind.OUTPUT, 1 << 30), "over the limit of 1048576"),
        (HEADER.pack(FrameKind.MESSAGE, 2) + b"\x08\x05", "answered a LAYER frame with a MESSAGE frame"),
        (HEADER.pack(9, 0), "unknown frame kind 9"),
    ],
)
def test_a_wrong_answer_fails_the_stream_with_a_named_problem(frame: bytes, needle: str) -> None:
    with stream_and_peer() as (stream, peer):
        peer.sendall(frame)
        with pytest.raises(AttentionPodError, match=r"attention pod 127\.0\.0\.1:1: ") as info:
            stream.receive_output(5, 2, SHAPE, torch.float32, timeout_s=5)
        assert needle in str(info.value)
        assert stream.failure is info.value  # the stream is closed: the next step opens a fresh one


def test_an_error_frame_carries_the_pods_status() -> None:
    with stream_and_peer() as (stream, peer):
        send_error(peer, "INVALID_ARGUMENT", "step 5 expects layer 1 next, got layer 2")
        with pytest.raises(AttentionPodError, match="INVALID_ARGUMENT: step 5 expects layer 1") as info:
            stream.receive_output(5, 2, SHAPE, torch.float32, timeout_s=5)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_no_answer_within_the_timeout_is_deadline_exceeded() -> None:
    with stream_and_peer() as (stream, _peer):
        with pytest.raises(AttentionPodError, match=r"no answer within 0\.2 s") as info:
            stream.receive_output(5, 2, SHAPE, torch.float32, timeout_s=0.2)
        assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
