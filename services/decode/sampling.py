"""Sampling parameters and the sampler.

Every request owns a `torch.Generator`: seeded from `seed` when given, from the OS otherwise. Rows
are sampled with their own generator, so a seeded request draws the same tokens whatever else is in
the batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.core.attention import PolicySpec
from services.core.errors import InvalidRequestError

MAX_STOP_STRINGS = 16


@dataclass(slots=True, frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens at most (the context window may end the request first)
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability sums to top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # reproducible sampling
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not returned
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    # Not sampling, but per-request like the rest and carried with it to the attention part: the
    # request's decode attention policy (None: the attention part's default).
    attention_policy: PolicySpec | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a number >= 0 (0 = greedy), got {self.temperature}", "temperature"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}", "top_k")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidRequestError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return gen


def sample(
    logits: torch.Tensor,  # [M, V] fp32
    params: Sequence[SamplingParams],  # one per row
    generators: Sequence[torch.Generator],  # one per row
) -> list[int]:
    """One token id per row."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, gen)
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    scaled = logits / p.temperature  # [V]
    if p.top_k and p.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first token always stays.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
