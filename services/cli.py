"""`disagg` command line. Each subcommand is a small function; errors a user can fix exit with 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from services.core.errors import DisaggError
from services.core.model.sources import DEFAULT_MODEL
from services.core.runtime import keep_freed_memory
from services.loadgen import add_bench_parser
from services.tenants_cli import add_keys_parser, add_tenants_parser

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return int(args.func(args))
    except DisaggError as exc:
        print(f"disagg: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg",
        description="Disaggregated LLM inference: prefill, dense-decode and attention-memory pods.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_serve(sub)
    _add_up(sub)
    add_bench_parser(sub)
    _add_eval_attention(sub)
    add_keys_parser(sub)
    add_tenants_parser(sub)
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in model name, a Hugging Face Llama/Qwen2/Mistral folder, or a .gguf file "
        f"(default: {DEFAULT_MODEL}, bundled)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight and KV dtype (float32 on CPU; bf16/fp16 for GPUs)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument(
        "--kv-budget-gb",
        type=float,
        default=2.0,
        help="KV cache memory budget in GiB (for `up`: split over the attention pods)",
    )


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a completion for one prompt in this process",
        description="Load the model, generate one completion and stream it to stdout.",
    )
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="render PROMPT as one user message via the chat template"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0 = greedy (default 1.0, as in OpenAI's API)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object as the last line: prompt_token_ids, token_ids, text, finish_reason",
    )
    _add_policy_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    from services.core.policy import DEFAULT_BUDGET, PolicyName

    p.add_argument(
        "--attention-policy",
        default="dense",
        choices=[name.value for name in PolicyName],
        help="decode attention policy (docs/attention-policies.md; default dense)",
    )
    p.add_argument(
        "--attention-budget",
        type=float,
        default=DEFAULT_BUDGET,
        help=f"fraction of dense K/V bytes a decode step reads (> 0; >= 1: dense; default {DEFAULT_BUDGET})",
    )


def cmd_generate(args: argparse.Namespace) -> int:
    # Imported here so `disagg --help` stays instant.
    from services.core.model.load import load_model, parse_dtype
    from services.core.policy import PolicySpec
    from services.decode.colocated import build_engine
    from services.decode.sampling import SamplingParams

    params = SamplingParams(
        attention_policy=PolicySpec.parse(args.attention_policy, args.attention_budget),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    model = load_model(args.model, dtype=parse_dtype(args.dtype), device=args.device)
    engine = build_engine(model, kv_budget_bytes=int(args.kv_budget_gb * (1 << 30)))
    text = (
        model.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        if args.chat
        else args.prompt
    )
    prompt_ids = model.tokenizer.encode(text, add_special_tokens=not args.chat)
    seq_id = engine.add_request(prompt_ids, params)
    token_ids: list[int] = []
    pieces: list[str] = []
    finish = None
    while finish is None:
        for event in engine.step():
            if event.seq_id != seq_id:
                continue
            if event.token_id is not None:
                token_ids.append(event.token_id)
            pieces.append(event.text)
            if not args.json:
                print(event.text, end="", flush=True)
            finish = event.finish_reason
    if args.json:
        result = {
            "prompt_token_ids": prompt_ids,
            "token_ids": token_ids,
            "text": "".join(pieces),
            "finish_reason": finish.value,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        print()
    return 0


_SERVE_ROLES = {
    "gateway": "services.gateway.server",  # the OpenAI API (FastAPI); --colocated or the cluster
    "attention": "services.attention.server",  # KV cache + attention, no weights
    "prefill": "services.prefill.server",  # full model over prompts, KV shipped to attention pods
    "decode": "services.decode.server",  # continuous batching, attention on attention pods
}


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run one pod: gateway | attention | prefill | decode (what each Kubernetes pod runs)",
        description="Run one pod in the foreground until SIGTERM. `disagg serve ROLE --help` lists the "
        "role's flags; every pod flag also reads an environment variable DISAGG_<ROLE>_<FLAG>.",
    )
    p.add_argument("role", choices=list(_SERVE_ROLES), help="which pod to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the role's own flags")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(_SERVE_ROLES[args.role])
    return int(module.main(args.args) or 0)


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="start a local cluster and serve the OpenAI API",
        description="Start Redis (valkey), attention, prefill and decode pods and the gateway as local "
        "processes; print `ready: URL` once requests are served; stop everything on Ctrl-C or SIGTERM. "
        "--colocated serves the same API from one process with local attention instead (the baseline).",
    )
    p.add_argument("--port", type=int, default=8000, help="gateway port (0 = pick a free one)")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    p.add_argument("--prefill", type=int, default=1, help="prefill pods (0: decode pods prefill; default 1)")
    p.add_argument("--decode", type=int, default=1, help="dense-decode pods (default 1)")
    p.add_argument("--attention", type=int, default=2, help="attention-memory pods (default 2)")
    p.add_argument(
        "--placement",
        choices=["request", "head"],
        default="request",
        help="KV of a request on one attention pod (request; default: each micro-batch then talks to "
        "fewer pods) or its KV heads split across pods (head, Lamina's choice)",
    )
    p.add_argument(
        "--redis-url",
        help="use this Redis instead of starting a private valkey-server; with --colocated: the Redis "
        "holding tenants and API keys (without it, colocated mode is single-tenant)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="running batch per decode pod (default 64)")
    p.add_argument(
        "--remote-prefill-min-tokens",
        type=int,
        default=512,
        help="prompts of at least this many tokens are prefilled on a prefill pod; shorter ones by their "
        "decode pod, inside its running batch (conditional disaggregation; default 512, 2 = every prompt)",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=2,
        help="ping-pong micro-batches per decode forward: the dense part of one runs while the attention "
        "pods work on another (default 2; 1 = no overlap)",
    )
    p.add_argument(
        "--micro-batch-min-context",
        type=int,
        default=512,
        help="split a decode forward into micro-batches only when its rows attend over at least this "
        "many positions on average: at shorter contexts there is too little attention to hide "
        "(default 512; 0 = always split)",
    )
    p.add_argument(
        "--prompt-attention",
        choices=["decode", "pods"],
        default="decode",
        help="who attends a prompt's first chunk when the decode pod prefills it: the decode pod (default: "
        "it attends only to itself, so only its K/V go to the attention pods) or the attention pods (q and "
        "the output cross the network too)",
    )
    p.add_argument(
        "--transport",
        choices=["grpc", "nixl"],
        default="grpc",
        help="how prompts' K/V go from prefill to attention pods: gRPC ImportKV (default) or NIXL WRITEs "
        "straight into the attention pods' KV pools (UCX: RDMA where the host has it, shared memory here)",
    )
    p.add_argument(
        "--step-transport",
        choices=["tcp", "grpc"],
        default="tcp",
        help="what carries each layer's q/k/v and attention output between decode and attention pods: "
        "the attention pods' Step socket (tcp, default: length-prefixed frames, no gRPC thread handoffs) "
        "or the gRPC Step stream (grpc)",
    )
    p.add_argument("--colocated", action="store_true", help="one engine process with local attention")
    p.add_argument(
        "--cost-usd-per-hour",
        action="append",
        default=[],
        metavar="ROLE=USD",
        help="price of each pod of ROLE (gateway, prefill, decode, attention), repeatable; --colocated: "
        "USD alone, the process's price (cost accounting, docs/cost.md)",
    )
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also start a real Prometheus (Debian's `prometheus`) scraping every pod, with the recording "
        "rules loaded; prints `prometheus: URL`",
    )
    p.add_argument(
        "--scrape-interval", type=float, default=2.0, help="Prometheus scrape interval, s (default 2)"
    )
    _add_policy_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_up)


def parse_prices(items: Sequence[str]) -> dict[str, float]:
    """`ROLE=USD` items -> {role: USD/hour}; DisaggError naming a malformed one."""
    prices = {}
    for item in items:
        role, sep, value = item.partition("=")
        try:
            prices[role.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise DisaggError(f"--cost-usd-per-hour takes ROLE=USD (e.g. decode=2.5), got {item!r}")
    return prices


def cmd_up(args: argparse.Namespace) -> int:
    if args.colocated:
        from services.gateway.server import main as gateway_main

        if args.prometheus:
            raise DisaggError("--prometheus starts with the cluster; scrape /metrics of --colocated yourself")
        argv = ["--colocated", "--model", args.model, "--dtype", args.dtype, "--device", args.device]
        argv += ["--kv-budget-gb", str(args.kv_budget_gb), "--host", args.host, "--port", str(args.port)]
        if args.cost_usd_per_hour:
            argv += ["--cost-usd-per-hour", args.cost_usd_per_hour[-1].rpartition("=")[2]]
        argv += ["--attention-policy", args.attention_policy]
        argv += ["--attention-budget", str(args.attention_budget)]
        if args.redis_url:  # colocated: a Redis for tenants and API keys only
            argv += ["--redis-url", args.redis_url]
        return gateway_main(argv)
    import logging

    from services.core.router import PlacementMode
    from services.launcher import ClusterPlan, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = ClusterPlan(
        port=args.port,
        host=args.host,
        prefill=args.prefill,
        decode=args.decode,
        attention=args.attention,
        placement=PlacementMode(args.placement),
        redis_url=args.redis_url,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        attention_kv_gb=args.kv_budget_gb / args.attention,
        max_num_seqs=args.max_num_seqs,
        remote_prefill_min_tokens=args.remote_prefill_min_tokens,
        micro_batches=args.micro_batches,
        micro_batch_min_context=args.micro_batch_min_context,
        prompt_attention=args.prompt_attention,
        transport=args.transport,
        prices=parse_prices(args.cost_usd_per_hour),
        prometheus=args.prometheus,
        scrape_interval_s=args.scrape_interval,
        attention_policy=args.attention_policy,
        attention_budget=args.attention_budget,
        step_transport=args.step_transport,
    )
    return run(plan)


def _add_eval_attention(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from services.core.policy import PolicyName

    p = sub.add_parser(
        "eval-attention",
        help="measure attention policies against dense on the bundled model",
        description="Perplexity (teacher forcing), greedy top-1 agreement and attention-mass recall on "
        "a shipped text, passkey retrieval at several lengths, K/V bytes read and attention time per "
        "step, each against dense in the same run (docs/attention-policies.md).",
    )
    names = [n.value for n in PolicyName]
    p.add_argument("--policy", default="all", choices=[*names, "all"], help="a policy, or all (default)")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of dense bytes (one policy)")
    p.add_argument("--scoring", default="vatp", choices=["h2o", "vatp"], help="heavy_hitter's score")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object, last line")
    p.add_argument("--plot", help="write quality vs bytes read to this PNG")
    p.add_argument("--windows", type=int, default=2, help="text windows decoded as one batch (default 2)")
    p.add_argument("--context", type=int, default=2048, help="exactly prefilled tokens per window (2048)")
    p.add_argument("--scored", type=int, default=384, help="teacher-forced tokens per window (384)")
    p.add_argument("--agreement-steps", type=int, default=128, help="greedy steps compared per window (128)")
    p.add_argument(
        "--passkey-lengths", default="1024,2048,4096", help="comma-separated prompt lengths in tokens"
    )
    p.add_argument("--passkey-trials", type=int, default=5, help="passkey prompts per length")
    p.add_argument("--timing-rounds", type=int, default=8, help="timed decode steps per policy (8)")
    p.add_argument(
        "--timing-threads",
        type=int,
        default=1,
        help="torch threads while timing attention (default 1, as attention pods run in `disagg up`)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    p.set_defaults(func=cmd_eval_attention)


def cmd_eval_attention(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from services.attention import evaluate
    from services.core.model.load import load_model
    from services.core.policy import Scoring

    try:
        lengths = tuple(int(n) for n in args.passkey_lengths.split(","))
    except ValueError:
        raise DisaggError(
            f"--passkey-lengths takes integers like 1024,2048, got {args.passkey_lengths!r}"
        ) from None
    counts = (*lengths, args.windows, args.context, args.scored, args.passkey_trials)
    if min((*counts, args.timing_threads, args.timing_rounds)) < 1:
        raise DisaggError("lengths, windows, context, scored tokens, trials, threads and rounds must be >= 1")
    config = evaluate.EvalConfig(
        windows=args.windows,
        context=args.context,
        scored=args.scored,
        agreement_steps=args.agreement_steps,
        passkey_lengths=lengths,
        passkey_trials=args.passkey_trials,
        timing_threads=args.timing_threads,
        timing_rounds=args.timing_rounds,
    )
    specs = evaluate.sweep(args.policy, args.budget, Scoring(args.scoring))
    console = Console(stderr=args.json)
    model = load_model(args.model, show_progress=not args.json)
    results = evaluate.run(model, specs, config, console)
    evaluate.print_results(results, args.json, console)
    if args.plot:
        evaluate.plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
