"""`disagg eval-attention`: quality, bytes and speed of the attention policies on the bundled model.

    disagg eval-attention --policy sparq --budget 0.125 [--json] [--plot FILE.png]
    disagg eval-attention --policy all [--plot FILE.png]      # every policy at budgets 1/2, 1/4, 1/8

Lifecycle: load the model ─▶ for each task (eval_tasks.py: text, agreement, passkey per length)
prefill its prompts once, exactly, then run dense and every requested policy from that snapshot ─▶
one result per policy and budget: a rich table, and with --json a last line holding one JSON object
(one policy: the result itself; --policy all: {"results": [...]}) ─▶ with --plot, quality against
bytes read. Dense is run in the same process as every policy, so each ratio has its baseline from
the same run. Times are the attention part's wall time per decode step (all layers, the batch of
passkey prompts at the longest length), median over the answer's steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from services.attention import eval_tasks as tasks
from services.core.attention import DENSE, PolicyName, PolicySpec, Scoring
from services.core.model.load import LoadedModel

SWEEP_BUDGETS = (0.5, 0.25, 0.125)
SPARSE = [name for name in PolicyName if name is not PolicyName.DENSE]


@dataclass(slots=True, frozen=True)
class EvalConfig:
    windows: int = 2  # text windows, decoded together as one batch
    context: int = 2048  # tokens of each window prefilled exactly before the scored ones
    scored: int = 384  # teacher-forced tokens per window (perplexity)
    # Greedy steps compared with dense per window: 2 windows x 128 = 256 steps, so one token is 0.4
    # points (at 64 per window the ±0.027 interval was as wide as the margins the bars are judged by).
    agreement_steps: int = 128
    passkey_lengths: tuple[int, ...] = (1024, 2048, 4096)
    passkey_trials: int = 5  # prompts per length (the key at evenly spaced depths)
    answer_tokens: int = 8  # greedy tokens of each passkey answer
    timing_rounds: int = 8  # timed decode steps of dense and of each policy, alternately
    timing_threads: int = 1  # torch threads while timing: attention pods run one (`disagg up`)
    max_batch_tokens: int = 16384  # prompt tokens of one batched run (bounds the eval's memory)
    seed: int = 0  # picks the passkeys


@dataclass(slots=True)
class PolicyResult:
    policy: str
    budget: float
    scoring: str | None  # heavy_hitter only
    top1_agreement: float = 0.0
    attention_mass_recall: float = 0.0
    perplexity: float = 0.0
    dense_perplexity: float = 0.0
    bytes_ratio: float = 0.0  # K/V bytes read over the text task / dense's, both measured
    passkey_accuracy: dict[str, float] = field(default_factory=dict)  # by prompt length
    dense_passkey_accuracy: dict[str, float] = field(default_factory=dict)
    attention_ms_per_step: float = 0.0  # at the longest passkey length
    dense_attention_ms_per_step: float = 0.0
    step_time_ratio: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def text_ids(model: LoadedModel) -> list[int]:
    """The shipped long text (Alice's Adventures in Wonderland, chapters I-II; public domain)."""
    text = resources.files("services.attention").joinpath("data/alice.txt").read_text(encoding="utf-8")
    return model.tokenizer.encode(text)


def sweep(policy: str, budget: float, scoring: Scoring) -> list[PolicySpec]:
    """The specs `--policy` asks for: one, or every sparse policy at SWEEP_BUDGETS for "all"
    (heavy_hitter with both scorings, `scoring` first)."""
    if policy != "all":
        return [PolicySpec.parse(policy, budget, scoring.value)]
    specs = []
    for name in SPARSE:
        scorings = (
            [scoring, *(s for s in Scoring if s is not scoring)]
            if name is PolicyName.HEAVY_HITTER
            else [scoring]
        )
        specs += [PolicySpec(name, b, how) for how in scorings for b in SWEEP_BUDGETS]
    return specs


def evaluate(
    model: LoadedModel, specs: list[PolicySpec], config: EvalConfig, advance: Callable[[str], None]
) -> list[PolicyResult]:
    """Run every task for dense and for each spec; `advance(label)` after each unit of work."""
    results = {s: PolicyResult(s.name.value, float(s.budget or 1.0), _scoring(s)) for s in specs}
    windows = tasks.text_windows(text_ids(model), config.windows, config.context, config.scored)
    text = tasks.Prefilled(
        model, [w[: config.context] for w in windows], max(config.scored, config.agreement_steps)
    )
    (dense_text,) = tasks.run_text(text, [DENSE], windows)
    (dense_agree,) = tasks.run_agreement(text, [DENSE], config.agreement_steps, None)
    advance("text: dense")
    for batch in _batches(specs, config.windows * (config.context + config.scored), config.max_batch_tokens):
        runs = tasks.run_text(text, batch, windows)
        agrees = tasks.run_agreement(text, batch, config.agreement_steps, dense_agree.tokens)
        for spec, run, agree in zip(batch, runs, agrees, strict=True):
            r = results[spec]
            r.perplexity, r.dense_perplexity = run.perplexity, dense_text.perplexity
            r.bytes_ratio = run.bytes_read / dense_text.bytes_read
            r.top1_agreement, r.attention_mass_recall = agree.agreement, agree.mass_recall
            advance(f"text: {spec.describe()}")
    del text
    for length in config.passkey_lengths:
        prompts, keys = tasks.passkey_prompts(
            model.tokenizer.encode, length, config.passkey_trials, config.seed
        )
        room = max(config.answer_tokens, config.timing_rounds + 1)
        prefilled = tasks.Prefilled(model, prompts, room)
        (dense,) = tasks.run_passkey(prefilled, [DENSE], keys, config.answer_tokens)
        advance(f"passkey {length}: dense")
        for batch in _batches(specs, len(prompts) * length, config.max_batch_tokens):
            for spec, accuracy in zip(
                batch, tasks.run_passkey(prefilled, batch, keys, config.answer_tokens), strict=True
            ):
                results[spec].passkey_accuracy[str(length)] = accuracy
                results[spec].dense_passkey_accuracy[str(length)] = dense
                advance(f"passkey {length}: {spec.describe()}")
        if length == max(config.passkey_lengths):
            for spec in specs:
                times = tasks.time_attention(prefilled, spec, config.timing_rounds, config.timing_threads)
                r = results[spec]
                r.attention_ms_per_step, r.dense_attention_ms_per_step = times.policy_ms, times.dense_ms
                r.step_time_ratio = times.policy_ms / times.dense_ms
                advance(f"attention time: {spec.describe()}")
    return list(results.values())


def _batches(specs: list[PolicySpec], tokens_per_spec: int, max_tokens: int) -> list[list[PolicySpec]]:
    """Specs of one policy run together (one batch), as many as `max_tokens` of KV allow."""
    per_batch = max(1, max_tokens // tokens_per_spec)
    batches: list[list[PolicySpec]] = []
    for name in dict.fromkeys(s.name for s in specs):
        same = [s for s in specs if s.name is name]
        batches += [same[i : i + per_batch] for i in range(0, len(same), per_batch)]
    return batches


def _scoring(spec: PolicySpec) -> str | None:
    return spec.scoring.value if spec.name is PolicyName.HEAVY_HITTER else None


def table(results: list[PolicyResult]) -> Table:
    lengths = list(results[0].passkey_accuracy) if results else []
    out = Table(title="attention policies vs dense (SmolLM2-135M)")
    for column in ["policy", "budget", "top-1 agree", "ppl / dense", "mass recall"]:
        out.add_column(column, justify="left" if column == "policy" else "right")
    for length in lengths:
        out.add_column(f"passkey {length}", justify="right")
    out.add_column("bytes / dense", justify="right")
    out.add_column("attn time / dense", justify="right")
    for r in results:
        name = r.policy + (f" ({r.scoring})" if r.scoring else "")
        keys = [f"{r.passkey_accuracy[n]:.0%} ({r.dense_passkey_accuracy[n]:.0%})" for n in lengths]
        out.add_row(
            name,
            f"{r.budget:g}",
            f"{r.top1_agreement:.3f}",
            f"{r.perplexity / r.dense_perplexity:.3f}",
            f"{r.attention_mass_recall:.3f}",
            *keys,
            f"{r.bytes_ratio:.3f}",
            f"{r.step_time_ratio:.2f}",
        )
    return out


def plot(results: list[PolicyResult], path: Path) -> None:
    """Quality (top-1 agreement, perplexity vs dense) against bytes read, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r.policy + (f" ({r.scoring})" if r.scoring else "") for r in results):
        same = (r for r in results if r.policy + (f" ({r.scoring})" if r.scoring else "") == name)
        points = sorted(same, key=lambda r: r.bytes_ratio)
        x = [r.bytes_ratio for r in points]
        left.plot(x, [r.top1_agreement for r in points], marker="o", label=name)
        right.plot(x, [r.perplexity / r.dense_perplexity for r in points], marker="o", label=name)
    left.set(xlabel="K/V bytes read / dense", ylabel="greedy top-1 agreement with dense")
    right.set(xlabel="K/V bytes read / dense", ylabel="perplexity / dense")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Attention policies on SmolLM2-135M: quality vs bytes read per decode step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    model: LoadedModel, specs: list[PolicySpec], config: EvalConfig, console: Console
) -> list[PolicyResult]:
    """`evaluate` with a progress bar on `console` (stderr for --json)."""
    units = (1 + len(specs)) * (1 + len(config.passkey_lengths)) + len(specs)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=units)
        return evaluate(
            model, specs, config, lambda label: progress.update(task, advance=1, description=label)
        )


def print_results(results: list[PolicyResult], as_json: bool, console: Console) -> None:
    console.print(table(results))
    if as_json:
        payload = results[0].to_json() if len(results) == 1 else {"results": [r.to_json() for r in results]}
        print(json.dumps(payload))
