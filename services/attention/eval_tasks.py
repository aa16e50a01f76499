"""The measurements behind `disagg eval-attention` (evaluate.py drives them and prints the results).

Every task prefills its prompts once, exactly (prefill is policy-free), snapshots the KV pool, and
then runs each policy from a copy of that snapshot, one decode step at a time for a batch of
sequences, through the real model and the same `LocalAttention` that attention pods run:

    Prefilled(model, prompts)                     prompts[:-1] prefilled exactly, K/V snapshotted
    part = prefilled.part(spec)                   a fresh pool holding the snapshot, sequences in spec
    logits = decode(model, part, tokens, positions, wrap)   one decode step: the policy acts here

Tasks (numbers of tokens are EvalConfig fields):
- text: windows of the shipped text; the last context token and then the text's next tokens are fed
  one at a time (teacher forcing), so the policy acts at every scored step: perplexity, bytes read.
- agreement: from the same contexts, dense greedy decoding gives a continuation; each policy is fed
  that continuation and its greedy choice is compared with dense's at every step (top-1 agreement),
  and the attention mass its reads cover is measured against a dense shadow pool (mass recall).
- passkey: a 5-digit key hidden at several depths of filler text at each length; greedy answer;
  the attention part's time per decode step at the longest length (median over the steps).
"""

from __future__ import annotations

import functools
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention, LocalStep
from services.attention.policies.dense import DenseStep
from services.attention.reference import DecodeBucket, paged_decode_attention
from services.core.attention import DENSE, AttentionStep, PolicySpec, SeqChunk
from services.core.errors import DisaggError
from services.core.model.load import LoadedModel

Wrap = Callable[[LocalStep], AttentionStep]


class Prefilled:
    """Prompts prefilled once with exact attention, copied into a fresh part per run.

    A run may hold several specs: copy c of prompt i is sequence c * P + i (P prompts), opened with
    specs[c], so one batched decode step serves every spec (the dense part's cost is shared).
    """

    def __init__(self, model: LoadedModel, prompts: Sequence[Sequence[int]], room: int) -> None:
        """prompts[i][:-1] is prefilled; `room` more positions are reserved for the decode steps."""
        self.model = model
        self.prompts = [list(p) for p in prompts]
        self.room = room
        cfg = model.config
        self.pool_config = KVPoolConfig(cfg.num_layers, cfg.head_dim, 16, model.dense.dtype)
        self.snapshot = self._open([DENSE])
        for seq, prompt in enumerate(self.prompts):  # one prompt per forward bounds the memory
            n = len(prompt) - 1
            step = self.snapshot.begin([SeqChunk(seq, 0, n)])
            self.model.dense.forward(torch.tensor(prompt[:n]), torch.arange(n), step)

    def _open(self, specs: Sequence[PolicySpec]) -> LocalAttention:
        cfg, bs = self.model.config, self.pool_config.block_size
        per_copy = sum(-(-(len(p) + self.room) // bs) for p in self.prompts) * cfg.num_kv_heads
        pool = KVPool(self.pool_config, per_copy * len(specs))
        part = LocalAttention(pool, cfg.num_kv_heads, cfg.num_heads)
        for c, spec in enumerate(specs):
            for i, prompt in enumerate(self.prompts):
                part.open(c * len(self.prompts) + i, spec)
                part.reserve(c * len(self.prompts) + i, len(prompt) + self.room)
        return part

    def part(self, specs: Sequence[PolicySpec]) -> LocalAttention:
        """A fresh part holding the prefilled K/V once per spec."""
        part = self._open(specs)
        source = torch.tensor([self.snapshot.pool.allocator.block_table(i) for i in range(len(self.prompts))])
        for c in range(len(specs)):
            ids = range(c * len(self.prompts), (c + 1) * len(self.prompts))
            target = torch.tensor([part.pool.allocator.block_table(i) for i in ids])
            src, dst = source.reshape(-1), target.reshape(-1)
            for layer in range(len(part.pool.k)):
                part.pool.k[layer].index_copy_(0, dst, self.snapshot.pool.k[layer].index_select(0, src))
                part.pool.v[layer].index_copy_(0, dst, self.snapshot.pool.v[layer].index_select(0, src))
        return part


def decode(
    model: LoadedModel,
    part: LocalAttention,
    tokens: Sequence[int],  # one per sequence 0..B-1
    position: int,  # every sequence is at the same position (lockstep)
    wrap: Wrap | None = None,
) -> torch.Tensor:  # [B, V] fp32 logits
    step = part.begin([SeqChunk(seq, position, 1) for seq in range(len(tokens))])
    hidden = model.dense.forward(
        torch.tensor(list(tokens)),
        torch.full((len(tokens),), position, dtype=torch.long),
        wrap(step) if wrap else step,
    )
    return model.dense.logits(hidden).float()


# ---- text: perplexity and bytes ------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class TextResult:
    perplexity: float
    bytes_read: int  # K/V bytes the policy read over every scored step


def text_windows(ids: Sequence[int], windows: int, context: int, scored: int) -> list[list[int]]:
    """`windows` disjoint windows of context + scored tokens (the text must hold them)."""
    size = context + scored
    if windows * size > len(ids):
        raise DisaggError(
            f"the text has {len(ids)} tokens, fewer than {windows} windows of {size}: ask for fewer"
        )
    return [list(ids[i * size : (i + 1) * size]) for i in range(windows)]


def run_text(
    prefilled: Prefilled, specs: Sequence[PolicySpec], windows: Sequence[Sequence[int]]
) -> list[TextResult]:
    """Teacher forcing past the prefilled contexts: the step at position p feeds window[p] and
    scores window[p + 1], from the last context token to the end of the windows."""
    part = prefilled.part(specs)
    rows = [w for _ in specs for w in windows]  # sequence c * W + i
    nll = torch.zeros(len(rows), dtype=torch.float64)
    start = len(prefilled.prompts[0]) - 1
    for pos in range(start, len(windows[0]) - 1):
        logits = decode(prefilled.model, part, [w[pos] for w in rows], pos)
        target = torch.tensor([w[pos + 1] for w in rows])
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="none").double()
    per_spec = nll.view(len(specs), -1).sum(dim=1) / (len(windows) * (len(windows[0]) - 1 - start))
    read = part.bytes_read_by_spec()
    return [
        TextResult(math.exp(float(x)), read.get(spec, 0)) for spec, x in zip(specs, per_spec, strict=True)
    ]


# ---- agreement and attention-mass recall ---------------------------------------------------------
@dataclass(slots=True, frozen=True)
class AgreementResult:
    tokens: list[list[int]]  # the greedy choice at every step, per prompt
    agreement: float  # fraction of steps whose greedy choice equals the reference's
    mass_recall: float  # mean over steps, layers, lanes and heads of the dense mass attended


class RecallProbe(AttentionStep):
    """Runs a step and, per layer, measures how much of the dense attention mass (over a shadow
    pool that keeps every token) the positions each lane's policy reads cover."""

    def __init__(self, step: LocalStep, shadow: LocalStep, covered: torch.Tensor) -> None:
        self.step, self.shadow = step, shadow
        self.covered = covered  # [M] running sums over layers and heads, per lane

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        part, shadow = self.step.part, self.shadow.part
        d = q.shape[-1]
        lanes_q = q.reshape(-1, part.group, d)  # [M, G, D]
        k_lanes, v_lanes = k_new.reshape(-1, d), v_new.reshape(-1, d)
        part.pool.write(layer, self.step.write_slots, k_lanes, v_lanes)  # before `attended` reads it
        shadow.pool.write(layer, self.shadow.write_slots, k_lanes, v_lanes)
        (dense,) = self.shadow.groups
        if not isinstance(dense.step, DenseStep):
            raise TypeError("the shadow part must run dense")
        m, g = lanes_q.shape[0], part.group
        width = max(lane.positions for lane in dense.step.lanes)
        probs = torch.zeros((m, g, width), dtype=torch.float32)  # dense attention over every token

        def keep(bucket: DecodeBucket, p: torch.Tensor) -> None:  # p [n, G, W], W in whole blocks
            w = min(width, p.shape[-1])
            probs[bucket.lanes, :, :w] = p[:, :, :w]

        paged_decode_attention(
            lanes_q,
            shadow.pool.k[layer],
            shadow.pool.v[layer],
            dense.step.layout,
            shadow.scale,
            on_probs=keep,
        )
        for group in self.step.groups:
            attended = group.step.attended(layer, lanes_q.index_select(0, group.index))  # [m, positions]
            mass = probs.index_select(0, group.index)[:, :, : attended.shape[1]]
            self.covered.index_add_(0, group.index, (mass * attended[:, None, :]).sum(dim=(1, 2)).double())
        return self.step.attend(layer, q, k_new, v_new)


def run_agreement(
    prefilled: Prefilled, specs: Sequence[PolicySpec], steps: int, reference: list[list[int]] | None
) -> list[AgreementResult]:
    """Greedy decoding fed `reference`'s tokens (None: each row's own greedy tokens, for dense)."""
    model, prompts = prefilled.model, prefilled.prompts
    part, shadow = prefilled.part(specs), prefilled.part([DENSE] * len(specs))
    rows = len(specs) * len(prompts)
    heads, group = model.config.num_kv_heads, model.config.group_size
    covered = torch.zeros(rows * heads, dtype=torch.float64)
    fed = [p[-1] for _ in specs for p in prompts]
    chosen: list[list[int]] = [[] for _ in range(rows)]
    start = len(prompts[0]) - 1
    for t in range(steps):
        shadow_step = shadow.begin([SeqChunk(s, start + t, 1) for s in range(rows)])
        probe = functools.partial(RecallProbe, shadow=shadow_step, covered=covered)
        logits = decode(model, part, fed, start + t, probe)
        greedy = logits.argmax(dim=-1).tolist()
        for row, token in enumerate(greedy):
            chosen[row].append(token)
        fed = greedy if reference is None else [r[t] for _ in specs for r in reference]
    recall = covered.view(len(specs), -1).sum(dim=1) / (
        len(prompts) * heads * group * model.config.num_layers * steps
    )
    results = []
    for c in range(len(specs)):
        mine = chosen[c * len(prompts) : (c + 1) * len(prompts)]
        truth = mine if reference is None else reference
        agree = sum(a == b for x, y in zip(mine, truth, strict=True) for a, b in zip(x, y, strict=True))
        results.append(AgreementResult(mine, agree / (steps * len(prompts)), float(recall[c])))
    return results


# ---- passkey and attention time ------------------------------------------------------------------
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(encode: Callable[[str], list[int]], length: int, depth: float, key: str) -> list[int]:
    """About `length` tokens: intro, filler with the key line at `depth` (0..1), the question."""
    intro, filler = encode(PASSKEY_INTRO), encode(PASSKEY_FILLER)
    line, question = encode(PASSKEY_LINE.format(key=key)), encode(PASSKEY_QUESTION)
    repeats = max(1, (length - len(intro) - len(line) - len(question)) // len(filler))
    before = round(repeats * depth)
    return intro + filler * before + line + filler * (repeats - before) + question


def passkey_prompts(
    encode: Callable[[str], list[int]], length: int, trials: int, seed: int
) -> tuple[list[list[int]], list[str]]:
    rng = random.Random(seed * 100_003 + length)
    keys = [str(rng.randint(10_000, 99_999)) for _ in range(trials)]
    depths = [(i + 0.5) / trials for i in range(trials)]
    return [passkey_prompt(encode, length, d, k) for d, k in zip(depths, keys, strict=True)], keys


def run_passkey(
    prefilled: Prefilled, specs: Sequence[PolicySpec], keys: Sequence[str], answer_tokens: int
) -> list[float]:
    """Per spec, the fraction of prompts whose greedy answer contains the key."""
    model, prompts = prefilled.model, prefilled.prompts
    part = prefilled.part(specs)
    fed = [p[-1] for _ in specs for p in prompts]
    answers: list[list[int]] = [[] for _ in fed]
    for t in range(answer_tokens):
        fed = decode(model, part, fed, len(prompts[0]) - 1 + t).argmax(dim=-1).tolist()
        for row, token in enumerate(fed):
            answers[row].append(token)
    found = [
        key in model.tokenizer.decode(a) for a, key in zip(answers, list(keys) * len(specs), strict=True)
    ]
    n = len(prompts)
    return [sum(found[c * n : (c + 1) * n]) / n for c in range(len(specs))]


@dataclass(slots=True, frozen=True)
class StepTimes:
    policy_ms: float  # median attention-part time of one decode step (every layer, `begin` included)
    dense_ms: float  # the same for dense, measured alternately with the policy


def time_attention(
    prefilled: Prefilled, spec: PolicySpec, rounds: int, threads: int, seed: int = 0
) -> StepTimes:
    """Decode steps of the attention part alone over the prefilled prompts (random q, k, v: the time
    does not depend on them) on `threads` torch threads, dense and the policy alternately so that
    both see the same load. The first step of each (building per-block data, heavy_hitter's first
    eviction) is a warm-up."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_attention(prefilled, spec, rounds, seed)
    finally:
        torch.set_num_threads(before)


def _time_attention(prefilled: Prefilled, spec: PolicySpec, rounds: int, seed: int) -> StepTimes:
    cfg = prefilled.model.config
    gen = torch.Generator().manual_seed(seed)
    b = len(prefilled.prompts)
    inputs = [
        (
            torch.randn(b, cfg.num_heads, cfg.head_dim, generator=gen),
            torch.randn(b, cfg.num_kv_heads, cfg.head_dim, generator=gen),
            torch.randn(b, cfg.num_kv_heads, cfg.head_dim, generator=gen),
        )
        for _ in range(cfg.num_layers)
    ]
    parts = {"policy": prefilled.part([spec]), "dense": prefilled.part([DENSE])}
    times: dict[str, list[float]] = {"policy": [], "dense": []}
    start = len(prefilled.prompts[0]) - 1
    for r in range(min(rounds + 1, prefilled.room)):
        for name, part in parts.items():
            began = time.perf_counter()
            step = part.begin([SeqChunk(seq, start + r, 1) for seq in range(b)])
            for layer, (q, k, v) in enumerate(inputs):
                step.attend(layer, q, k, v)
            if r:
                times[name].append(time.perf_counter() - began)
    return StepTimes(statistics.median(times["policy"]) * 1e3, statistics.median(times["dense"]) * 1e3)
