"""Attention policies as data: what a request, the CLI and the wire say about decode attention.

No torch here (the CLI builds its flags from it). The policies themselves are in
services/attention/policies/; docs/attention-policies.md describes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

from services.core.errors import InvalidRequestError


class PolicyName(Enum):
    """Decode attention policies (services/attention/policies/, docs/attention-policies.md)."""

    DENSE = "dense"  # exact attention over every cached token
    SINK_WINDOW = "sink_window"  # StreamingLLM: the first tokens and a recent window
    HEAVY_HITTER = "heavy_hitter"  # H2O / VATP: keeps the highest-scoring tokens, evicts (frees) the rest
    SPARQ = "sparq"  # SparQ: top-r query components pick the top-k keys (plus a recent window)
    QUEST = "quest"  # Quest: per-block min/max key bounds pick the top blocks


class Scoring(Enum):
    """How heavy_hitter scores a cached token."""

    H2O = "h2o"  # attention accumulated over the decode steps so far
    VATP = "vatp"  # the same, times the token's ‖v‖₁ (value-aware token pruning)


@dataclass(slots=True, frozen=True)
class PolicySpec:
    """One request's attention policy, as the API, the CLI and the wire carry it.

    budget: the fraction of dense K/V bytes a decode step may read (policies keep floors: a few sink
    tokens and a recent window); >= 1 means exactly dense; None: the serving part's default budget.
    """

    name: PolicyName = PolicyName.DENSE
    budget: float | None = None
    scoring: Scoring = Scoring.VATP  # heavy_hitter only

    def __post_init__(self) -> None:
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise InvalidRequestError(
                f"attention_policy.budget must be a number > 0 (a fraction of dense bytes; >= 1 is "
                f"dense), got {self.budget}",
                "attention_policy",
            )

    @classmethod
    def parse(cls, name: str, budget: float | None = None, scoring: str | None = None) -> PolicySpec:
        """From strings (API, CLI, wire); InvalidRequestError lists the valid choices."""
        try:
            policy = PolicyName(name)
        except ValueError:
            known = ", ".join(p.value for p in PolicyName)
            raise InvalidRequestError(
                f"unknown attention policy {name!r}; choose one of: {known}", "attention_policy"
            ) from None
        try:
            how = Scoring(scoring) if scoring else Scoring.VATP
        except ValueError:
            known = ", ".join(s.value for s in Scoring)
            raise InvalidRequestError(
                f"unknown heavy_hitter scoring {scoring!r}; choose one of: {known}", "attention_policy"
            ) from None
        return cls(policy, budget, how)

    @classmethod
    def from_wire(cls, name: str, budget: float | None, scoring: str) -> PolicySpec | None:
        """From proto fields: an empty name is None (the serving side's default policy)."""
        return cls.parse(name, budget, scoring) if name else None

    def with_default_budget(self, budget: float) -> PolicySpec:
        return self if self.budget is not None else replace(self, budget=budget)

    @property
    def is_dense(self) -> bool:
        """Exact attention whatever the context: the dense policy, or a budget of at least 1."""
        return self.name is PolicyName.DENSE or (self.budget is not None and self.budget >= 1.0)

    def describe(self) -> str:
        extra = f", {self.scoring.value}" if self.name is PolicyName.HEAVY_HITTER else ""
        budget = "default" if self.budget is None else f"{self.budget:g}"
        return f"{self.name.value} (budget {budget}{extra})"


DENSE = PolicySpec(PolicyName.DENSE, 1.0)
DEFAULT_BUDGET = 0.25  # of a policy named without a budget, unless the server sets another
DEFAULT_POLICY = PolicySpec(PolicyName.DENSE, DEFAULT_BUDGET)  # of a request that names none
