"""The seam between the dense part and the attention part of the model.

The dense part (services/core/model/dense.py) owns every weight; the attention part owns the KV
cache and nothing else. Per forward pass the dense part calls:

    step = attention.begin(chunks)            # once: which rows, at which positions
    for layer in range(L):
        o = step.attend(layer, q, k_new, v_new)   # q [N,Hq,D], k_new/v_new [N,Hkv,D] -> o [N,Hq,D]

or, to overlap its own work with the attention part's (ping-pong micro-batches, one step each):

        pending = step.submit(layer, q, k_new, v_new)   # starts the layer's attention
        ... the dense part of another micro-batch runs here ...
        o = pending()                                    # waits for o

N is the number of new tokens in the forward: one per sequence in a decode step, a whole chunk per
sequence in prefill. Rows are laid out chunk after chunk, in the order of `chunks`. The attention
part appends k_new/v_new at the chunk's positions, then attends each new token causally over
everything its sequence holds. Where the part runs (this process, an attention pod over gRPC or
NIXL) is invisible to the dense part.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.core.policy import (  # re-exported: the seam's callers name policies through here
    DEFAULT_BUDGET,
    DEFAULT_POLICY,
    DENSE,
    PolicyName,
    PolicySpec,
    Scoring,
)

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_POLICY",
    "DENSE",
    "AttentionPart",
    "AttentionStep",
    "OutOfBlocks",
    "PolicyName",
    "PolicySpec",
    "ReserveResult",
    "Reserved",
    "Scoring",
    "SeqChunk",
]


@dataclass(slots=True, frozen=True)
class Reserved:
    """The sequence now has room for `capacity_tokens` positions."""

    capacity_tokens: int
    new_blocks: int  # blocks taken from the free list by this call


@dataclass(slots=True, frozen=True)
class OutOfBlocks:
    """Not enough free KV blocks; nothing was allocated. The scheduler queues or preempts."""

    needed: int  # blocks the reservation would have taken
    free: int  # blocks free at the time


ReserveResult = Reserved | OutOfBlocks


@dataclass(slots=True, frozen=True)
class SeqChunk:
    """New tokens of one sequence in one forward pass."""

    seq_id: int
    start: int  # position of the first new token == tokens already in the KV cache
    length: int  # new tokens (1 in a decode step)
    # K/V only: the caller attends this chunk itself and the part only stores its K/V (an attention
    # pod's StepChunk.kv_only; RemoteAttention sets it for a prompt's first chunk). Its lanes are
    # absent from q and from the output of `attend_lanes`.
    kv_only: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length


class AttentionStep(ABC):
    """One forward pass's view of the attention part; created by `AttentionPart.begin`."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Append k_new/v_new for `layer`, return attention output.

        q: [N, Hq, D]; k_new, v_new: [N, Hkv, D]; returns o: [N, Hq, D] (same dtype as q).
        """

    def submit(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> Callable[[], torch.Tensor]:
        """Start `attend`; the returned function gives o. A part that computes elsewhere (an
        attention pod) returns before o exists, so the caller can work meanwhile; this default
        computes in place. Results must be collected in submission order, one layer at a time
        per step."""
        o = self.attend(layer, q, k_new, v_new)
        return lambda: o


class AttentionPart(ABC):
    """Owner of the KV cache: sequences are opened, grown by forwards, and freed."""

    @abstractmethod
    def open(self, seq_id: int, policy: PolicySpec | None = None) -> None:
        """Start an empty sequence holding no blocks yet; its decode steps attend with `policy`
        (None: the part's default policy)."""

    @abstractmethod
    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult:
        """Grow the sequence to hold `num_tokens` positions in total; all-or-nothing."""

    @abstractmethod
    def free(self, seq_id: int) -> None:
        """Drop the sequence's KV now; unknown ids are a no-op."""

    @abstractmethod
    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the part could ever hold (an upper bound for admission)."""

    @abstractmethod
    def begin(self, chunks: Sequence[SeqChunk]) -> AttentionStep:
        """Prepare one forward over `chunks`; their KV blocks must already be reserved."""
