"""`disagg bench --plot`: the latency distributions and the output throughput of a run, in one PNG.

    +----------------------------+----------------------------+
    | TTFT: histogram + CDF      | ITL: histogram + CDF       |
    +----------------------------+----------------------------+
    | e2e: histogram + CDF       | output tokens/s, 1 s bins  |
    +----------------------------+----------------------------+

Drawn with matplotlib's object API (`Figure` + `savefig`, which renders PNGs with Agg) rather than
pyplot: no global backend to switch, no figure registry to leak. Successful requests only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.core.errors import DisaggError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from services.loadgen import RequestRecord


def require_matplotlib() -> None:
    """Raise a DisaggError that says how to install matplotlib when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise DisaggError(
            "--plot needs matplotlib: install it with `.venv/bin/pip install 'matplotlib>=3.8'`"
        ) from exc


def throughput_bins(records: Sequence[RequestRecord], bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(bin starts [B], output tokens/s in each bin [B]) by chunk arrival time since the run started.

    A request's output tokens are spread evenly over its text chunks: a chunk may carry several tokens,
    and usage.completion_tokens is the only exact count."""
    times: list[float] = []
    weights: list[float] = []
    for record in records:
        if record.error is None and record.chunk_s:
            times += record.chunk_s
            weights += [record.output_tokens / len(record.chunk_s)] * len(record.chunk_s)
    if not times:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(0.0, max(times) + bin_s, bin_s)  # [B + 1]
    tokens, _ = np.histogram(times, bins=edges, weights=weights)
    return edges[:-1], tokens / bin_s


def _distribution(ax: Axes, values_s: Sequence[float], name: str) -> None:
    """Histogram (left axis, counts) and empirical CDF (right axis) of one latency, in ms."""
    ax.set_title(name)
    ax.set_xlabel("ms")
    if not values_s:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    ms = np.sort(np.asarray(values_s, dtype=float) * 1000)
    ax.hist(ms, bins=min(50, max(5, len(ms) // 2)), color="tab:blue", alpha=0.6)
    ax.set_ylabel("count")
    cdf = ax.twinx()
    cdf.plot(ms, np.arange(1, len(ms) + 1) / len(ms), color="tab:red", drawstyle="steps-post")
    cdf.set_ylim(0, 1.02)
    cdf.set_ylabel("CDF")


def plot_run(records: Sequence[RequestRecord], path: Path, title: str) -> None:
    """Write the four panels of the module docstring to `path` (PNG)."""
    from matplotlib.figure import Figure

    ok = [r for r in records if r.error is None]
    figure = Figure(figsize=(12, 8), layout="constrained")
    figure.suptitle(title)
    (ttft, itl), (e2e, rate) = figure.subplots(2, 2)
    _distribution(ttft, [r.ttft_s for r in ok if r.ttft_s is not None], "time to first token")
    _distribution(itl, [gap for r in ok for gap in r.itl_s], "inter-token latency")
    _distribution(e2e, [r.e2e_s for r in ok], "end-to-end latency")
    starts, per_s = throughput_bins(ok)
    rate.set_title("output throughput")
    rate.bar(starts, per_s, width=1.0, align="edge", color="tab:green")
    rate.set_xlabel("seconds since start")
    rate.set_ylabel("output tokens/s (1 s bins)")
    figure.savefig(path, format="png", dpi=100)
