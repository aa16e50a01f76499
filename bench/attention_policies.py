"""Attention policies on SmolLM2-135M: `disagg eval-attention --policy all` recorded in RESULTS.md.

    .venv/bin/python bench/attention_policies.py [--plot docs/attention-policies.png] [--no-write]

Runs the same evaluation as `disagg eval-attention --policy all --plot docs/attention-policies.png`
(services/attention/evaluate.py, default settings) for every sparse policy at budgets 1/2, 1/4, 1/8
with dense as the baseline in the same run, and writes the table, the plot and which acceptance
bars of issue 5 are met to the `attention-policies` section of bench/RESULTS.md, with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._results import write_section
from services.attention import evaluate
from services.core.attention import PolicyName, Scoring
from services.core.model.load import load_model

ROOT = Path(__file__).resolve().parent.parent


def bars(results: list[evaluate.PolicyResult], comparisons: int) -> list[tuple[str, bool, str]]:
    """(bar, met, measured) for each acceptance bar of the issue; agreements with their binomial
    standard error over `comparisons` greedy steps."""
    by = {(r.policy, r.budget): r for r in results if r.scoring is None}
    out: list[tuple[str, bool, str]] = []

    def agree(r: evaluate.PolicyResult) -> str:
        p = r.top1_agreement
        return f"{p:.3f} ± {(p * (1 - p) / comparisons) ** 0.5:.3f}"

    def ppl(r: evaluate.PolicyResult) -> float:
        return r.perplexity / r.dense_perplexity

    if (s := by.get(("sparq", 0.125))) is not None:
        out.append(("sparq 1/8: top-1 agreement >= 0.90", s.top1_agreement >= 0.90, agree(s)))
        out.append(("sparq 1/8: perplexity <= 1.05x dense", ppl(s) <= 1.05, f"{ppl(s):.3f}x"))
        out.append(("sparq 1/8: bytes <= 0.20x dense", s.bytes_ratio <= 0.20, f"{s.bytes_ratio:.3f}x"))
        key = "2048"
        if key in s.passkey_accuracy:
            drop = s.dense_passkey_accuracy[key] - s.passkey_accuracy[key]
            text = f"{s.passkey_accuracy[key]:.0%} vs dense {s.dense_passkey_accuracy[key]:.0%}"
            out.append(("sparq 1/8: passkey at 2K within 5 points of dense", drop <= 0.05, text))
        speed = 1 / s.step_time_ratio
        out.append(("sparq 1/8: attention step at 4K >= 2x faster than dense", speed >= 2, f"{speed:.2f}x"))
    for name in ("sparq", "quest"):
        if (r := by.get((name, 0.25))) is not None:
            out.append((f"{name} 1/4: top-1 agreement >= 0.95", r.top1_agreement >= 0.95, agree(r)))
            out.append((f"{name} 1/4: perplexity <= 1.02x dense", ppl(r) <= 1.02, f"{ppl(r):.3f}x"))
    for h in (r for r in results if r.policy == "heavy_hitter" and r.budget == 0.5):
        bar = f"heavy_hitter ({h.scoring}) 1/2: top-1 agreement >= 0.90"
        out.append((bar, h.top1_agreement >= 0.90, agree(h)))
    return out


def describe(config: evaluate.EvalConfig, dense_perplexity: float) -> str:
    c = config
    return (
        f"Text: {c.windows} windows of {c.context} tokens prefilled + {c.scored} teacher-forced (perplexity; "
        f"dense {dense_perplexity:.3f}); top-1 agreement over {c.windows * c.agreement_steps} greedy steps; "
        f"passkey: {c.passkey_trials} prompts per length, dense in parentheses. Bytes: K/V bytes each policy "
        "counted as read over the teacher-forced text, over dense's. Attention time: the attention part's "
        f"median time per decode step (all layers, {c.passkey_trials} prompts at {max(c.passkey_lengths)} "
        f"tokens, {c.timing_threads} torch thread as attention pods run in `disagg up`, {c.timing_rounds} "
        "steps after a warm-up), dense and the policy alternately, so both see the same load (dense's time "
        "varies between rows with the machine's load; the ratio is paired)."
    )


def markdown(
    results: list[evaluate.PolicyResult], saved: dict[str, Any], config: evaluate.EvalConfig, plot: Path
) -> str:
    lengths = list(results[0].passkey_accuracy)
    head = ["policy", "budget", "top-1 agree", "ppl / dense", "mass recall"]
    head += [f"passkey {n}" for n in lengths] + ["bytes / dense", "attn ms/step (dense)", "attn time / dense"]
    lines = [
        "## Attention policies (issue 5)",
        "",
        f"`{saved['command']}`: the sweep took {saved['seconds'] / 60:.1f} min on {os.cpu_count()} CPUs "
        f"(shared with other work), torch {torch.__version__}; raw results in "
        "`bench/attention_policies.json`, rendered here by "
        "`python bench/attention_policies.py --from-json bench/attention_policies.json`.",
        "",
        describe(config, results[0].dense_perplexity),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in results:
        name = r.policy + (f" ({r.scoring})" if r.scoring else "")
        keys = [f"{r.passkey_accuracy[n]:.0%} ({r.dense_passkey_accuracy[n]:.0%})" for n in lengths]
        row = [name, f"{r.budget:g}", f"{r.top1_agreement:.3f}", f"{r.perplexity / r.dense_perplexity:.3f}"]
        row += [f"{r.attention_mass_recall:.3f}", *keys, f"{r.bytes_ratio:.3f}"]
        row += [
            f"{r.attention_ms_per_step:.1f} ({r.dense_attention_ms_per_step:.1f})",
            f"{r.step_time_ratio:.2f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"![quality vs bytes]({os.path.relpath(plot, ROOT / 'bench')})", "", "Acceptance bars:", ""]
    lines += [
        f"- {'met' if ok else '**not met**'}: {bar} (measured {value})"
        for bar, ok, value in bars(results, config.windows * config.agreement_steps)
    ]
    return "\n".join(lines)


def short_markdown(results: list[evaluate.PolicyResult], config: evaluate.EvalConfig) -> str:
    lines = [
        f"At 1K contexts ({config.windows} windows of {config.context} prefilled + {config.scored} scored "
        f"tokens, {config.agreement_steps} greedy steps each; same run):",
        "",
        "| policy | budget | top-1 agree | ppl / dense | mass recall | bytes / dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.budget:g} | {r.top1_agreement:.3f} | {r.perplexity / r.dense_perplexity:.3f} "
            f"| {r.attention_mass_recall:.3f} | {r.bytes_ratio:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "attention-policies.png")
    parser.add_argument("--scoring", default="vatp", choices=[s.value for s in Scoring])
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--json", type=Path, help="also save the raw results here")
    parser.add_argument("--from-json", type=Path, help="render results saved by --json instead of running")
    args = parser.parse_args(argv)
    console = Console()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
    else:
        saved = run_all(Scoring(args.scoring), console)
        saved["command"] = " ".join(
            ["python bench/attention_policies.py", *(sys.argv[1:] if argv is None else argv)]
        )
        if args.json:
            args.json.write_text(json.dumps(saved, indent=1))
    results = [evaluate.PolicyResult(**r) for r in saved["results"]]
    short = [evaluate.PolicyResult(**r) for r in saved["short_results"]]
    evaluate.plot(results, args.plot)
    body = markdown(results, saved, evaluate.EvalConfig(**saved["config"]), args.plot)
    body += "\n\n" + short_markdown(short, evaluate.EvalConfig(**saved["short_config"]))
    console.print(body, markup=False, highlight=False)
    if not args.no_write:
        write_section("attention-policies", body)
    return 0


def run_all(scoring: Scoring, console: Console) -> dict[str, Any]:
    """The default sweep, then sparq and quest again at 1K contexts (a budget buys half the tokens)."""
    model = load_model("smollm2-135m")
    specs = evaluate.sweep("all", 0.25, scoring)
    started = time.perf_counter()
    results = evaluate.run(model, specs, evaluate.EvalConfig(), console)
    seconds = time.perf_counter() - started
    evaluate.print_results(results, False, console)
    short = evaluate.EvalConfig(windows=4, context=1024, scored=192, agreement_steps=32, passkey_lengths=())
    short_specs = [s for s in specs if s.name in (PolicyName.SPARQ, PolicyName.QUEST)]
    short_results = evaluate.run(model, short_specs, short, console)
    return {
        "seconds": seconds,
        "config": dataclasses.asdict(evaluate.EvalConfig()),
        "results": [r.to_json() for r in results],
        "short_results": [r.to_json() for r in short_results],
        "short_config": dataclasses.asdict(short) | {"passkey_lengths": []},
    }


if __name__ == "__main__":
    sys.exit(main())
