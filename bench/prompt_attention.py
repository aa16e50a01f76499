"""Who attends a prompt's first chunk: the decode pod (kv_only on the pods) or the attention pods.

    .venv/bin/python bench/prompt_attention.py [--requests 32] [--prompt 192] [--new 64]
                                               [--rounds 2] [--no-write]

In one process, three engines over the real SmolLM2-135M weights, driven directly (no gateway, no
load generator): the colocated engine, and two decode engines with `RemoteAttention` over the same
two real attention pod processes (request placement, one torch thread each, Step socket): one
attending prompts' first chunks itself (`local_prompt_attention`, the default `--prompt-attention
decode`) and one leaving them to the pods (`pods`). Each round runs the three on the same greedy
requests, all added before the first step, and checks that the two disaggregated engines produce
the colocated engine's tokens. Per engine: wall seconds, the seconds of steps with prompt tokens and
of pure decode steps (with the part spent waiting for the pods), the pods' CPU seconds (/proc), the
activation bytes the decode side sent and received (its `LinkMetrics`), output tok/s; the ratios
are per round.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._pods import attention_pod, cpu_seconds
from bench._results import write_section
from services.core.model.load import load_model
from services.core.placement import Placement
from services.decode.colocated import build_engine
from services.decode.engine import Engine
from services.decode.metering import LinkMetrics
from services.decode.remote_attention import RemoteAttention, RemoteAttentionOptions
from services.decode.sampling import SamplingParams
from services.decode.scheduler import SchedulerConfig

MODES = ("colocated", "decode", "pods")  # who attends prompts: colocated engine, decode pod, pods


class CountingLink(LinkMetrics):
    """The decode side's activation bytes, both ways (what `disagg_transfer_bytes_total` counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_bytes = self.received_bytes = 0

    def sent(self, transport: str, nbytes: int) -> None:
        super().sent(transport, nbytes)
        self.sent_bytes += nbytes

    def received(self, transport: str, nbytes: int) -> None:
        super().received(transport, nbytes)
        self.received_bytes += nbytes


@dataclass(slots=True)
class Run:
    wall: float
    prompt_steps: float  # seconds of steps with prompt tokens
    prompt_wait: float  # ... spent waiting for the pods
    decode_steps: float  # seconds of pure decode steps
    decode_wait: float
    pods_cpu: float  # both pods' CPU seconds
    sent: int  # activation bytes, decode side
    received: int
    tokens_per_s: float
    tokens: list[list[int]]


def run(engine: Engine, prompts: list[list[int]], new: int, pids: list[int]) -> Run:
    link = getattr(engine.attention, "link", None)
    counting = isinstance(link, CountingLink)
    bytes0 = (link.sent_bytes, link.received_bytes) if counting else (0, 0)
    cpu0 = sum(cpu_seconds(p) for p in pids)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    times = {True: [0.0, 0.0], False: [0.0, 0.0]}  # step has prompt tokens -> [seconds, waited]
    started = time.perf_counter()
    while engine.has_work():
        prompt_step = any(r.seq.num_computed < len(r.seq.prompt_ids) for r in engine._requests.values())
        waited, step_start = getattr(engine.attention, "wait_seconds", 0.0), time.perf_counter()
        for event in engine.step():
            if event.token_id is not None:
                out[event.seq_id].append(event.token_id)
        times[prompt_step][0] += time.perf_counter() - step_start
        times[prompt_step][1] += getattr(engine.attention, "wait_seconds", 0.0) - waited
    wall = time.perf_counter() - started
    sent, received = (link.sent_bytes - bytes0[0], link.received_bytes - bytes0[1]) if counting else (0, 0)
    return Run(
        wall,
        *times[True],
        *times[False],
        sum(cpu_seconds(p) for p in pids) - cpu0,
        sent,
        received,
        len(prompts) * new / wall,
        [out[i] for i in ids],
    )


def measure(requests: int, prompt: int, new: int, rounds: int) -> dict[str, list[Run]]:
    model = load_model("smollm2-135m", show_progress=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt)] for _ in range(requests)]
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    pod_settings = {"kv_budget_bytes": str(1 << 30), "torch_threads": "1"}
    with ExitStack() as stack:
        pods = [stack.enter_context(attention_pod(pod_settings)) for _ in range(2)]
        pids = [pid for _, pid in pods]

        def placement(seq_id: int) -> Placement:
            return Placement.request_partitioned(pods[seq_id % 2][0], model.config.num_kv_heads)

        engines = {"colocated": build_engine(model, kv_budget_bytes=1 << 30)}
        for mode in ("decode", "pods"):
            options = RemoteAttentionOptions(layer_timeout_s=60, local_prompt_attention=mode == "decode")
            remote = RemoteAttention(model.config, torch.float32, placement, options, link=CountingLink())
            config = SchedulerConfig(max_model_len=model.config.max_position_embeddings)
            engines[mode] = Engine(
                model.dense, remote, model.tokenizer, config, 2, micro_batch_min_context=512
            )
        for engine in engines.values():  # warm-up: first calls, numba's cache, the pods' streams
            run(engine, prompts[:2], 4, pids)
        for round_ in range(rounds):
            order = MODES[round_ % 3 :] + MODES[: round_ % 3]  # rotate who goes first
            for mode in order:
                runs[mode].append(run(engines[mode], prompts, new, pids))
                print(f"round {round_ + 1}: {mode} {runs[mode][-1].tokens_per_s:.1f} tok/s", flush=True)
    for mode in ("decode", "pods"):
        for got, expected in zip(runs[mode], runs["colocated"], strict=True):
            if got.tokens != expected.tokens:
                raise SystemExit(f"prompt attention {mode}: greedy tokens differ from the colocated engine")
    return runs


def render(runs: dict[str, list[Run]]) -> str:
    labels = {"colocated": "colocated", "decode": "decode pod (default)", "pods": "attention pods"}
    lines = [
        "| prompts attended by | wall s | prompt steps s (wait) | decode steps s (wait) | pods' CPU s "
        "| activations sent / received MB | tok/s | vs colocated | vs attention pods |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        rs, med = runs[mode], statistics.median
        vs_colo = [r.tokens_per_s / c.tokens_per_s for r, c in zip(rs, runs["colocated"], strict=True)]
        vs_pods = [r.tokens_per_s / p.tokens_per_s for r, p in zip(rs, runs["pods"], strict=True)]
        lines.append(
            f"| {labels[mode]} | {med([r.wall for r in rs]):.1f} "
            f"| {med([r.prompt_steps for r in rs]):.1f} ({med([r.prompt_wait for r in rs]):.1f}) "
            f"| {med([r.decode_steps for r in rs]):.1f} ({med([r.decode_wait for r in rs]):.1f}) "
            f"| {med([r.pods_cpu for r in rs]):.1f} "
            f"| {med([r.sent for r in rs]) / 1e6:.0f} / {med([r.received for r in rs]) / 1e6:.0f} "
            f"| {med([r.tokens_per_s for r in rs]):.1f} "
            f"| **{med(vs_colo):.2f}×** ({', '.join(f'{x:.2f}' for x in vs_colo)}) "
            f"| **{med(vs_pods):.2f}×** ({', '.join(f'{x:.2f}' for x in vs_pods)}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests (default 32)")
    parser.add_argument("--prompt", type=int, default=192, help="prompt tokens each (default 192)")
    parser.add_argument("--new", type=int, default=64, help="new tokens each (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the three engines (default 2)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    runs = measure(args.requests, args.prompt, args.new, args.rounds)
    body = render(runs)
    Console().print(body)
    if not args.no_write:
        command = ".venv/bin/python bench/prompt_attention.py " + " ".join(sys.argv[1:])
        write_section(
            "prompt_attention",
            "## Who attends a prompt's first chunk (bench/prompt_attention.py)\n\n"
            f"Command: `{command.strip()}`\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
            f"{args.requests} requests × ({args.prompt} + {args.new}) tokens, greedy, added at once; "
            "in one process, no gateway; 2 attention pod processes; the same tokens from all three "
            f"engines (checked); medians over {args.rounds} rounds rotating the order, ratios per round "
            "(listed).\n\n" + body,
        )


if __name__ == "__main__":
    main()
