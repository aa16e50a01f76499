"""Paged decode attention on one GPU: torch baselines vs the Triton kernels, against the copy ceiling.

    python3 bench/gpu_attention.py [--json rows.json] [--quick] [--tune] [--stages]

One call: (1) measures the device copy bandwidth (a large device-to-device copy, bytes read + written);
(2) for each model shape, pool block size, batch and context, times

    sdpa      gather the lanes' blocks to contiguous [B, Hkv, S, D], then F.scaled_dot_product_attention
              (enable_gqa); the gather is part of the time, as it would be in the pod
    reference services.attention.reference.paged_decode_attention (the pod's torch path)
    triton    kernels.paged_decode.paged_decode_attention (split-K flash-decoding over the block table)
    sparq     kernels.sparq.sparq_decode_triton at 1/8 of dense bytes: r = D/8 components and k = S/16
              keys (window 64 inside k): r·S + 2·k·D = S·D/8 + S·D/8 = (2·S·D)/8 per lane

Every lane has the same context S (batch × Hkv lanes), blocks are placed at random in the pool. Times are
medians of CUDA-event timings of CUDA-graph replays with the L2 flushed before each
(triton.testing.do_bench); `eager` re-times the Triton paths launched from Python as the pod does.
Bytes are what each method must read from the pool (dense: every K and V row once; SparQ: sparq_bytes),
so GB/s and %copy say how close each comes to the memory-bound floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from services.attention.kernels import PagedLanes, decode_bytes
from services.attention.kernels.sparq_pick import PickConfig
from services.attention.reference import DecodeLayout, DecodeWorkspace, paged_decode_attention

if TYPE_CHECKING:
    from services.attention.kernels.paged_decode import DecodeConfig

SHAPES = {"smollm2": (3, 3, 64), "llama8b": (8, 4, 128)}  # name: (Hkv, G, D)
SPARQ_WINDOW = 64


@dataclass(slots=True)
class Row:
    shape: str
    hkv: int
    group: int
    head_dim: int
    block_size: int
    batch: int
    context: int
    method: str
    time_us: float  # graph replay, L2 flushed
    eager_us: float | None  # launched from Python (Triton paths)
    bytes: int  # bytes the method must read from the pool
    gbps: float
    pct_copy: float  # gbps / measured copy bandwidth
    err: float  # ‖out - ref‖ / ‖ref‖; ref: reference.paged_decode_attention, sparq_decode_reference (sparq)


def bench_ms(fn: Callable[[], object], graph: bool = True) -> float:
    """Median ms per call, L2 flushed before each; `graph`: replay a CUDA graph of fn."""
    import triton.testing

    fn()  # compile and warm the allocator outside the capture
    if not graph:
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        fn()
    return float(triton.testing.do_bench(cuda_graph.replay, warmup=10, rep=60, return_mode="median"))


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), graph=False)
    return 2 * nbytes / (ms * 1e-3)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@dataclass(slots=True)
class Case:
    """One pool and one decode step: batch × Hkv lanes of `context` tokens in randomly placed blocks."""

    shape: str
    block_size: int
    batch: int
    context: int
    q: torch.Tensor  # [n_lanes, G, D]
    k_cache: torch.Tensor  # [num_blocks, bs, D]
    v_cache: torch.Tensor  # [num_blocks, bs, D]
    kt_cache: torch.Tensor  # [num_blocks, D, bs]
    table: torch.Tensor  # [n_lanes, S / bs] block ids
    lanes: PagedLanes

    @classmethod
    def make(cls, shape: str, block_size: int, batch: int, context: int, dtype: torch.dtype) -> Case:
        from services.attention.kernels import sparq

        hkv, group, head_dim = SHAPES[shape]
        n_lanes, per_lane = batch * hkv, context // block_size
        k_cache = torch.randn(n_lanes * per_lane, block_size, head_dim, device="cuda", dtype=dtype)
        table = torch.randperm(n_lanes * per_lane, device="cuda").view(n_lanes, per_lane)  # fragmented
        lanes = PagedLanes.build([(t, context) for t in table.tolist()], block_size, "cuda")
        q = torch.randn(n_lanes, group, head_dim, device="cuda", dtype=dtype)
        v_cache, kt_cache = torch.randn_like(k_cache), sparq.kt_from_k(k_cache)
        return cls(shape, block_size, batch, context, q, k_cache, v_cache, kt_cache, table, lanes)

    @property
    def dims(self) -> tuple[int, int, int]:
        return SHAPES[self.shape]

    @property
    def scale(self) -> float:
        return float(self.dims[2] ** -0.5)

    def dense_bytes(self) -> int:
        return decode_bytes([self.context] * self.lanes.n_lanes, self.dims[2], self.k_cache.element_size())

    def sparq_budget(self) -> tuple[int, int, int]:
        """(r, k, window) at 1/8 of dense bytes."""
        k = self.context // 16
        return self.dims[2] // 8, k, min(SPARQ_WINDOW, k)

    def methods(self) -> dict[str, Callable[[], torch.Tensor]]:
        from services.attention.kernels import paged_decode, sparq

        hkv, group, head_dim = self.dims
        q, k_cache, v_cache, kt_cache, lanes, scale = (
            self.q, self.k_cache, self.v_cache, self.kt_cache, self.lanes, self.scale
        )  # fmt: skip
        layout = DecodeLayout.build(
            [(t, self.context) for t in self.table.tolist()], self.block_size, group, "cuda"
        )
        workspace = DecodeWorkspace.for_layout(layout, k_cache)
        r, k, window = self.sparq_budget()

        def sdpa() -> torch.Tensor:
            shape = (self.batch, hkv, self.context, head_dim)
            keys = k_cache[self.table].view(shape)  # the gather: [B, Hkv, S, D]
            values = v_cache[self.table].view(shape)
            qh = q.view(self.batch, hkv * group, 1, head_dim)
            return F.scaled_dot_product_attention(qh, keys, values, scale=scale, enable_gqa=True)

        return {
            "sdpa": sdpa,
            "reference": lambda: paged_decode_attention(q, k_cache, v_cache, layout, scale, workspace),
            "triton": lambda: paged_decode.paged_decode_attention(q, k_cache, v_cache, lanes, scale),
            "sparq": lambda: (
                sparq.sparq_decode_triton(q, k_cache, v_cache, kt_cache, lanes, r, k, window, scale).out
            ),
        }


def run_case(case: Case, copy_bps: float) -> list[Row]:
    from services.attention.kernels import sparq

    hkv, group, head_dim = case.dims
    methods = case.methods()
    r, k, _ = case.sparq_budget()
    sparse = sparq.sparq_bytes(
        [case.context] * case.lanes.n_lanes, r, k, head_dim, case.k_cache.element_size()
    )
    reference = methods["reference"]().float()
    r, k, window = case.sparq_budget()
    sparq_reference = sparq.sparq_decode_reference(
        case.q, case.k_cache, case.v_cache, case.kt_cache, case.lanes, r, k, window, case.scale
    ).out
    rows = []
    for name, fn in methods.items():
        out = fn().reshape(case.q.shape)
        try:
            ms = bench_ms(fn)
        except RuntimeError as error:  # a path that cannot be captured is timed eagerly, and says so
            print(f"{name}: CUDA graph capture failed ({error}); timing it eagerly", flush=True)
            ms = bench_ms(fn, graph=False)
        eager = bench_ms(fn, graph=False) * 1e3 if name in ("triton", "sparq") else None
        nbytes = sparse if name.startswith("sparq") else case.dense_bytes()
        gbps = nbytes / (ms * 1e-3) / 1e9
        err = rel_err(out, sparq_reference if name.startswith("sparq") else reference)
        row = Row(case.shape, hkv, group, head_dim, case.block_size, case.batch, case.context, name, ms * 1e3,
                  eager, nbytes, gbps, 100 * gbps * 1e9 / copy_bps, err)  # fmt: skip
        rows.append(row)
    return rows


def _time_dense_config(case: Case, config: DecodeConfig) -> float:
    from services.attention.kernels import paged_decode

    q, k_cache, v_cache, lanes, scale = case.q, case.k_cache, case.v_cache, case.lanes, case.scale
    return bench_ms(
        lambda: paged_decode.paged_decode_attention(q, k_cache, v_cache, lanes, scale, config=config)
    )


def tune(dtype: torch.dtype) -> None:
    """Sweep the dense kernel's launch settings on a few shapes."""
    from services.attention.kernels.paged_decode import DecodeConfig

    console = Console()
    for shape, block_size, batch, context in [
        ("smollm2", 16, 64, 16384),
        ("llama8b", 16, 16, 16384),
        ("smollm2", 16, 4, 16384),
        ("llama8b", 16, 4, 16384),
    ]:
        case = Case.make(shape, block_size, batch, context, dtype)
        results = []
        for block_n in (32, 64, 128):
            for stages in (3, 4):  # 8 warps never won on the H100
                for per_sm in (2, 4, 8):
                    config = DecodeConfig(block_n, 4, stages, per_sm, 256)
                    results.append((case.dense_bytes() / _time_dense_config(case, config) / 1e6, config))
        results.sort(key=lambda x: -x[0])
        console.print(f"[bold]{shape} bs={block_size} batch={batch} ctx={context}[/]: best dense configs")
        for gbps, config in results[:5]:
            console.print(f"  {gbps:8.0f} GB/s  {config}")
        del case
        torch.cuda.empty_cache()


STAGE_CASES = [
    ("smollm2", 16, 64, 16384),
    ("llama8b", 16, 16, 16384),
    ("smollm2", 128, 64, 16384),
    ("llama8b", 128, 16, 16384),
    ("smollm2", 16, 16, 32768),
]


PICK_VARIANTS = {  # --stages: the sampled selection's launch settings against its defaults
    "acq_rel counters": PickConfig(sem="acq_rel"),
    "scan slots per tile": PickConfig(atomic_slots=False),
    "atomic slots": PickConfig(atomic_slots=True),
    "scan slots, acq_rel (before)": PickConfig(atomic_slots=False, sem="acq_rel"),
    "band 2048 keys / 4 warps": PickConfig(band_tile=2048),
    "band 2048 / 8": PickConfig(band_tile=2048, band_warps=8),
    "band 4096 / 8": PickConfig(band_tile=4096, band_warps=8),
    "band 512 / 2": PickConfig(band_tile=512, band_warps=2),
    "bounds 2 warps": PickConfig(bounds_warps=2),
    "bounds 4 warps": PickConfig(bounds_warps=4),
    "finish 1 warp": PickConfig(finish_warps=1),
    "finish 2 warps": PickConfig(finish_warps=2),
    "finish 8 warps": PickConfig(finish_warps=8),
}


# --stages: _sparq_logits launch settings (positions per tile, warps)
LOGITS_VARIANTS = [
    (512, 4), (256, 2), (256, 4), (1024, 4), (128, 1), (128, 2), (64, 1), (256, 1), (512, 2), (1024, 8),
]  # fmt: skip
# --stages: _sparq_keys launch settings (positions per step, steps per program, warps, stages)
KEYS_VARIANTS = [
    (512, 1, 4, 1), (1024, 1, 4, 1), (256, 1, 2, 1), (512, 4, 4, 2), (512, 8, 4, 3), (1024, 4, 4, 3),
    (256, 8, 2, 3), (256, 16, 1, 3), (128, 16, 1, 3), (2048, 2, 8, 2),
]  # fmt: skip
# --stages: phase-2 (gather mode) launch settings (rows per step, warps, pipeline stages, programs per SM)
GATHER_VARIANTS = [
    (32, 4, 3, 4), (32, 2, 4, 4), (64, 4, 4, 4), (64, 8, 3, 4), (128, 4, 3, 4), (128, 8, 3, 4),
    (64, 4, 3, 8), (32, 4, 3, 8), (64, 2, 3, 8),
]  # fmt: skip


def _try_ms(name: str, fn: Callable[[], object], nbytes: int = 0) -> float:
    try:
        ms = bench_ms(fn)
    except Exception as error:  # a variant that fails to compile is reported, not fatal
        print(f"  {name:34s} FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
        return float("nan")
    rate = f"{nbytes / (ms * 1e-3) / 1e9:7.0f} GB/s" if nbytes else ""
    print(f"  {name:34s} {ms * 1e3:8.1f} us {rate}", flush=True)
    return ms


def _stage_case(case: Case) -> None:
    from services.attention.kernels import paged_decode, sparq_pick
    from services.attention.kernels import sparq_kernels as sk

    q, k_cache, v_cache, kt_cache, lanes, scale = (
        case.q, case.k_cache, case.v_cache, case.kt_cache, case.lanes, case.scale
    )  # fmt: skip
    context, (r, k, window) = case.context, case.sparq_budget()
    n_lanes, group, head_dim = q.shape
    item = k_cache.element_size()
    kt_bytes, logit_bytes = n_lanes * context * r * item, n_lanes * context * group * 4  # fp32 e
    key_bytes = n_lanes * context * 4
    gather_bytes = n_lanes * k * 2 * head_dim * item
    idx, q_sel = sk.sparq_select(q, r, scale)
    e, stats = sk.sparq_logits(q_sel, idx, kt_cache, lanes, context)
    phase1 = sk.sparq_keys(e, stats, lanes, context, window)
    rows = sparq_pick.sparq_pick(phase1, lanes, k, context, window)
    methods = case.methods()
    print(f"== {case.shape} bs={case.block_size} B={case.batch} ctx={context} lanes={n_lanes} r={r} k={k}")
    _try_ms("dense (triton)", methods["triton"], case.dense_bytes())
    _try_ms("sparq step", methods["sparq"], kt_bytes + gather_bytes)
    _try_ms("select components", lambda: sk.sparq_select(q, r, scale))
    print(f"  (logits default {sk.LogitsConfig()}, keys default {sk.keys_config(n_lanes)})")
    for block_n, warps in LOGITS_VARIANTS:
        logits_config = sk.LogitsConfig(block_n, warps)
        _try_ms(
            f"logits bn={block_n} w={warps} (kt + e)",
            partial(sk.sparq_logits, q_sel, idx, kt_cache, lanes, context, logits_config),
            kt_bytes + logit_bytes,
        )
    _try_ms(
        "keys (e + keys)", lambda: sk.sparq_keys(e, stats, lanes, context, window), logit_bytes + key_bytes
    )
    for block_n, tiles, warps, n_stages in KEYS_VARIANTS:
        keys_config = sk.KeysConfig(block_n, tiles, warps, n_stages)
        _try_ms(
            f"keys bn={block_n} t={tiles} w={warps} s={n_stages} (e + keys)",
            partial(sk.sparq_keys, e, stats, lanes, context, window, keys_config),
            logit_bytes + key_bytes,
        )
    for launches in (1, 2, 3, 4):
        _try_ms(
            f"pick, sampled, first {launches} launches",
            partial(sparq_pick.sparq_pick, phase1, lanes, k, context, window, None, True, launches),
            key_bytes,
        )
    for name, config in PICK_VARIANTS.items():
        _try_ms(
            f"pick, {name}",
            partial(sparq_pick.sparq_pick, phase1, lanes, k, context, window, config=config),
            key_bytes,
        )
    _try_ms(
        "pick, one CTA/lane only",
        partial(sparq_pick.sparq_pick, phase1, lanes, k, context, window, None, False),
        key_bytes,
    )
    _try_ms(
        "phase 2 (gather rows + merge)",
        lambda: paged_decode.gathered_decode_attention(q, k_cache, v_cache, lanes, rows, scale),
        gather_bytes,
    )
    gather = paged_decode.gather_config(head_dim, k_cache.dtype)
    splits = paged_decode.num_splits_for(n_lanes, k, gather, q.device)
    for n_splits in sorted({max(1, splits // 2), splits * 2} - {splits}):
        _try_ms(
            f"phase 2, {n_splits} splits (default {splits})",
            partial(
                paged_decode.gathered_decode_attention, q, k_cache, v_cache, lanes, rows, scale, n_splits
            ),
            gather_bytes,
        )
    for block_n, warps, n_stages, per_sm in GATHER_VARIANTS:
        variant = replace(
            gather, block_n=block_n, num_warps=warps, num_stages=n_stages, programs_per_sm=per_sm
        )
        _try_ms(
            f"phase 2 bn={block_n} w={warps} s={n_stages} p/sm={per_sm}",
            partial(
                paged_decode.gathered_decode_attention, q, k_cache, v_cache, lanes, rows, scale, None, variant
            ),
            gather_bytes,
        )
    ordered = rows.sort(dim=1).values  # neighbouring rows of one block next to each other (-1 first)
    _try_ms(
        "phase 2, rows sorted (sort not timed)",
        lambda: paged_decode.gathered_decode_attention(q, k_cache, v_cache, lanes, ordered, scale),
        gather_bytes,
    )
    _try_ms("sort rows per lane (torch)", lambda: rows.sort(dim=1), 2 * rows.numel() * 4)


def parse_stage_cases(text: str | None) -> list[tuple[str, int, int, int]]:
    """`shape:bs:batch:context,...` (e.g. llama8b:128:64:32768); None: STAGE_CASES."""
    if not text:
        return STAGE_CASES
    cases = []
    for item in text.split(","):
        shape, bs, batch, context = item.split(":")
        if shape not in SHAPES:
            raise SystemExit(f"--stage-cases: unknown shape {shape!r}; pick from {', '.join(SHAPES)}")
        cases.append((shape, int(bs), int(batch), int(context)))
    return cases


def stages(dtype: torch.dtype, cases: list[tuple[str, int, int, int]]) -> None:
    """Time each launch of the SparQ step and its variants (phase-1 tiles, pick warps, phase-2 splits)."""
    for shape, block_size, batch, context in cases:
        _stage_case(Case.make(shape, block_size, batch, context, dtype))
        torch.cuda.empty_cache()


def print_table(rows: list[Row], copy_bps: float) -> None:
    table = Table(
        title=f"paged decode attention, {torch.cuda.get_device_name()}, copy {copy_bps / 1e9:.0f} GB/s"
    )
    for column in ("shape", "bs", "B", "ctx", "sdpa us", "ref us", "triton us", "eager", "%copy"):
        table.add_column(column, justify="right")
    for column in ("sparq us", "eager", "%copy", "x dense", "err", "sparq err"):
        table.add_column(column, justify="right")
    cases: dict[tuple[str, int, int, int], dict[str, Row]] = {}
    for row in rows:
        cases.setdefault((row.shape, row.block_size, row.batch, row.context), {})[row.method] = row
    for (shape, bs, batch, context), m in cases.items():
        tri, sp = m["triton"], m["sparq"]
        table.add_row(
            shape, str(bs), str(batch), f"{context // 1024}K", f"{m['sdpa'].time_us:.0f}",
            f"{m['reference'].time_us:.0f}", f"{tri.time_us:.1f}", f"{tri.eager_us:.1f}",
            f"{tri.pct_copy:.0f}", f"{sp.time_us:.1f}", f"{sp.eager_us:.1f}", f"{sp.pct_copy:.0f}",
            f"{tri.time_us / sp.time_us:.2f}", f"{tri.err:.0e}", f"{sp.err:.0e}",
        )  # fmt: skip
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="smollm2,llama8b", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--block-sizes", default="16,128", help="pool block sizes (positions per block)")
    parser.add_argument("--batches", default="1,4,16,64", help="sequences per step (lanes = batch × Hkv)")
    parser.add_argument("--contexts", default="4096,8192,16384,32768", help="tokens per sequence")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="batches 1,64 and contexts 4K,16K only")
    parser.add_argument("--tune", action="store_true", help="sweep kernel launch settings, then exit")
    parser.add_argument(
        "--stages", action="store_true", help="time each SparQ launch and variants, then exit"
    )
    parser.add_argument(
        "--stage-cases", help="with --stages: shape:bs:batch:context,... (default: the STAGE_CASES list)"
    )
    parser.add_argument("--json", type=Path, help="write the rows (and the copy bandwidth) to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_attention.py needs a CUDA GPU (the kernels are timed on the device)")
    dtype = getattr(torch, args.dtype)
    if args.tune or args.stages:
        tune(dtype) if args.tune else stages(dtype, parse_stage_cases(args.stage_cases))
        return
    batches = [1, 64] if args.quick else [int(x) for x in args.batches.split(",")]
    contexts = [4096, 16384] if args.quick else [int(x) for x in args.contexts.split(",")]
    copy_bps = copy_bandwidth()
    print(f"device copy bandwidth (read + write): {copy_bps / 1e9:.0f} GB/s", flush=True)
    rows: list[Row] = []
    for shape in args.shapes.split(","):
        for block_size in [int(x) for x in args.block_sizes.split(",")]:
            for batch in batches:
                for context in contexts:
                    case = run_case(Case.make(shape, block_size, batch, context, dtype), copy_bps)
                    torch.cuda.empty_cache()
                    rows.extend(case)
                    done = " ".join(f"{r.method}={r.time_us:.1f}us/{r.pct_copy:.0f}%" for r in case)
                    print(done, shape, block_size, batch, context, flush=True)
    print_table(rows, copy_bps)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype}
        payload = {"copy_bytes_per_s": copy_bps, **meta, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
