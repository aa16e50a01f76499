"""A real attention pod process for benchmarks, serving the SmolLM2-135M geometry (no weights)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_135M = {  # config.json of SmolLM2-135M; an attention pod reads only the geometry
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


def geometry_folder(folder: Path) -> Path:
    """A model folder holding SmolLM2-135M's config.json (and empty stand-ins for the other files)."""
    (folder / "config.json").write_text(json.dumps(SMOLLM2_135M))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@contextmanager
def attention_pod(settings: dict[str, str], redis_url: str | None = None) -> Iterator[tuple[str, int]]:
    """Start `python -m services.attention.server` with DISAGG_ATTENTION_<KEY> = value for each of
    `settings` (registered in `redis_url`, else standalone); yields (address, pid), kills it after."""
    with tempfile.TemporaryDirectory(prefix="disagg-bench-pod-") as tmp:
        folder = geometry_folder(Path(tmp))
        env = {**os.environ, "DISAGG_ATTENTION_MODEL": str(folder), "DISAGG_ATTENTION_PORT": "0"}
        env.update({f"DISAGG_ATTENTION_{key.upper()}": value for key, value in settings.items()})
        env.pop("DISAGG_REDIS_URL", None)
        if redis_url is not None:
            env["DISAGG_REDIS_URL"] = redis_url
        log_path = folder / "attention.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.attention.server"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            try:
                assert process.stdout is not None
                ready, _, _ = select.select([process.stdout], [], [], 120)
                line = process.stdout.readline() if ready else ""
                if "listening on" not in line:
                    raise SystemExit(f"attention pod did not start: {line!r}\n{log_path.read_text()}")
                yield line.rsplit(" ", 1)[1].strip(), process.pid
            finally:
                process.kill()
                process.wait(10)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has spent so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants_cpu_seconds(root: int) -> float:
    """CPU seconds of every live descendant of `root` (a launcher's pods), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    total, todo = 0.0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += cpu_seconds(pid)
        except OSError:  # ended meanwhile
            continue
    return total
