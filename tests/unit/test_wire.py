"""Tensor codec: round-trips through real protobuf bytes, and malformed messages rejected by name."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.wire import DTYPE_TO_WIRE, TensorLimits, WireError, WireProblem, decode, encode
from services.proto import tensor_pb2

LIMITS = TensorLimits(max_bytes=1 << 20)
DTYPES = list(DTYPE_TO_WIRE)


def _through_bytes(message: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    """What the receiver parses: the message after serialization."""
    return tensor_pb2.Tensor.FromString(message.SerializeToString())


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, dtype=torch.int64).to(dtype)


@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 6), max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
    transpose=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...], seed: int, transpose: bool) -> None:
    tensor = _random(shape, dtype, seed)
    if transpose and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)  # non-contiguous input: sent row-major as it reads
    message = _through_bytes(encode(tensor))
    assert len(message.data) == tensor.numel() * tensor.element_size()
    out = decode(message, LIMITS, dtype=dtype, shape=tuple(tensor.shape))
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


@dataclass(slots=True)
class _Held:
    """A message whose `data` is one bytes object (upb materializes a new one on every access)."""

    dtype: int
    shape: list[int]
    data: bytes


def test_decode_is_zero_copy_and_silent() -> None:
    data = torch.arange(12, dtype=torch.float32).numpy().tobytes()
    held = _Held(tensor_pb2.DTYPE_FLOAT32, [3, 4], data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frombuffer's read-only warning must not leak
        first, second = decode(held, LIMITS), decode(held, LIMITS)
    assert torch.equal(first, torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert first.data_ptr() == second.data_ptr() == torch.frombuffer(data, dtype=torch.uint8).data_ptr()


def _expect(problem: WireProblem, message: tensor_pb2.Tensor, *needles: str, **kwargs: object) -> None:
    with pytest.raises(WireError) as info:
        decode(message, LIMITS, name="q", **kwargs)  # type: ignore[arg-type]
    assert info.value.problem is problem
    for needle in ("q", *needles):
        assert needle in str(info.value)


def test_wrong_length_is_rejected() -> None:
    good = encode(torch.zeros(2, 3))
    short = tensor_pb2.Tensor(dtype=good.dtype, shape=good.shape, data=good.data[:-1])
    _expect(WireProblem.LENGTH, short, "23 bytes", "needs 24 bytes")
    long = tensor_pb2.Tensor(dtype=good.dtype, shape=good.shape, data=good.data + b"\0")
    _expect(WireProblem.LENGTH, long, "25 bytes")


def test_huge_shape_is_rejected_before_any_allocation() -> None:
    huge = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2**62, 2**62, 2**62], data=b"")
    _expect(WireProblem.TOO_LARGE, huge, "over the limit", str(LIMITS.max_bytes))
    just_over = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[LIMITS.max_bytes // 4 + 1])
    _expect(WireProblem.TOO_LARGE, just_over, "over the limit")
    empty_but_wide = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[0, 2**40, 2**40])
    _expect(WireProblem.TOO_LARGE, empty_but_wide, "over the limit")


def test_negative_dims_and_rank_are_rejected() -> None:
    _expect(WireProblem.SHAPE, tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4, -1]), "negative")
    deep = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1] * 9, data=b"\0" * 4)
    _expect(WireProblem.SHAPE, deep, "rank 9")


@pytest.mark.parametrize("wire_dtype", [tensor_pb2.DTYPE_UNSPECIFIED, 99])
def test_bad_dtype_is_rejected(wire_dtype: int) -> None:
    _expect(WireProblem.DTYPE, tensor_pb2.Tensor(dtype=wire_dtype, shape=[1], data=b"\0" * 4), "dtype")


def test_expectations_of_the_receiver() -> None:
    message = _through_bytes(encode(torch.zeros(2, 3)))
    _expect(WireProblem.DTYPE, message, "float16", dtype=torch.float16)
    _expect(WireProblem.SHAPE, message, "[2, 3]", "[3, 2]", shape=(3, 2))


def test_empty_and_scalar_tensors() -> None:
    empty = decode(_through_bytes(encode(torch.zeros(0, 5))), LIMITS)
    assert empty.shape == (0, 5)
    scalar = decode(_through_bytes(encode(torch.tensor(2.5))), LIMITS)
    assert scalar.shape == () and scalar.item() == 2.5


@given(
    wire_dtype=st.integers(-2, 8),
    shape=st.lists(st.integers(-3, 2**40), max_size=5),
    length=st.integers(0, 64),
)
@settings(max_examples=300, deadline=None)
def test_arbitrary_messages_decode_or_raise_wire_error(
    wire_dtype: int, shape: list[int], length: int
) -> None:
    """Whatever a peer sends, decoding never crashes with anything but WireError."""
    message = tensor_pb2.Tensor(shape=shape, data=b"\1" * length)
    message.dtype = wire_dtype if wire_dtype >= 0 else 0
    try:
        out = decode(_through_bytes(message), LIMITS)
    except WireError:
        return
    assert out.numel() * out.element_size() == length
