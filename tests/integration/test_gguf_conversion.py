"""The bundled SmolLM2-135M GGUF, converted to a HF folder, equals what transformers loads from the GGUF.

Uses the session fixtures `model_folder` (converted once into a temporary cache) and `hf_reference_model`
from tests/conftest.py. The reconversion test runs last in this module: it rebuilds the shared folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from services.core.errors import ModelLoadError
from services.core.model.config import ModelConfig
from services.core.model.gguf_convert import MARKER_FILE
from services.core.model.sources import DEFAULT_MODEL, resolve_model
from services.core.model.weights import load_weights

pytestmark = pytest.mark.slow

TEXTS = [
    "What is the capital of France?",
    "naïve café – Grüße, Здравствуйте, 你好世界",
    "emoji 🎉🚀 and 👩‍👩‍👧 family",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code\n\ttab",
    "<|im_start|>user\nHi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(bundled_gguf: Path) -> Any:
    """transformers' tokenizer converted straight from the GGUF (the reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_gguf.parent), gguf_file=bundled_gguf.name)


def test_weights_equal_transformers_gguf_loading(model_folder: Path, hf_reference_model: Any) -> None:
    weights = load_weights(model_folder, ModelConfig.from_folder(model_folder))
    reference = hf_reference_model.state_dict()
    assert sorted(weights) == sorted(reference)
    for name, tensor in reference.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], tensor), name


def test_config_matches_the_model(model_folder: Path, hf_reference_model: Any) -> None:
    config = ModelConfig.from_folder(model_folder)
    ref = hf_reference_model.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49152)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)
    assert config.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == ref.rms_norm_eps
    assert config.max_position_embeddings == ref.max_position_embeddings == 8192


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_json_encodes_like_hf(model_folder: Path, hf_gguf_tokenizer: Any, text: str) -> None:
    tokenizer = Tokenizer.from_file(str(model_folder / "tokenizer.json"))
    ids = tokenizer.encode(text).ids
    assert ids == hf_gguf_tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_is_kept(model_folder: Path, hf_gguf_tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer_config = json.loads((model_folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    converted = AutoTokenizer.from_pretrained(str(model_folder))
    assert converted.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        hf_gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def test_truncated_gguf_raises_model_load_error(bundled_gguf: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "SmolLM2-truncated.gguf"
    with bundled_gguf.open("rb") as source:
        truncated.write_bytes(source.read(bundled_gguf.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match=r"SmolLM2-truncated\.gguf.*download it again"):
        resolve_model(str(truncated), tmp_path / "cache", show_progress=False)


def test_second_resolve_is_fast_and_does_not_reconvert(model_folder: Path) -> None:
    marker = model_folder / MARKER_FILE
    before = (model_folder.stat().st_ino, marker.stat().st_mtime_ns)
    start = time.perf_counter()
    folder = resolve_model(DEFAULT_MODEL, model_folder.parent, show_progress=False)
    elapsed = time.perf_counter() - start
    assert folder == model_folder
    assert elapsed < 3.0
    assert (model_folder.stat().st_ino, marker.stat().st_mtime_ns) == before


def test_missing_marker_triggers_reconversion(model_folder: Path) -> None:
    old_inode = model_folder.stat().st_ino
    (model_folder / MARKER_FILE).unlink()  # as if the conversion had been interrupted
    folder = resolve_model(DEFAULT_MODEL, model_folder.parent, show_progress=False)
    assert folder == model_folder
    assert (folder / MARKER_FILE).is_file()
    assert folder.stat().st_ino != old_inode  # a fresh folder was renamed into place
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == [folder.name]
