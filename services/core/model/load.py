"""Load a model by name or path: resolve the folder, read config, weights and tokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.core.errors import DisaggError
from services.core.model.config import ModelConfig
from services.core.model.dense import DenseModel
from services.core.model.sources import resolve_model
from services.core.model.tokenizer import Tokenizer
from services.core.model.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True, frozen=True)
class LoadedModel:
    name: str  # what the user asked for (served as the OpenAI model id)
    folder: Path  # the Hugging Face style folder it was read from
    config: ModelConfig
    dense: DenseModel
    tokenizer: Tokenizer
    load_seconds: float


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise DisaggError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache_dir: Path | None = None,
    show_progress: bool = True,
) -> LoadedModel:
    started = time.perf_counter()
    folder = resolve_model(name_or_path, cache_dir, show_progress=show_progress)
    config = ModelConfig.from_folder(folder)
    weights = load_weights(folder, config, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_folder(folder, extra_eos_token_ids=config.eos_token_ids)
    return LoadedModel(
        name=name_or_path,
        folder=folder,
        config=config,
        dense=DenseModel(config, weights),
        tokenizer=tokenizer,
        load_seconds=time.perf_counter() - started,
    )
