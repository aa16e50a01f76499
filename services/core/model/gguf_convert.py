"""Convert a llama-architecture GGUF file into a Hugging Face style model folder, once.

Lifecycle of one conversion:

    read GGUF metadata ──▶ config.json
    dequantize every tensor (fp32), rename to HF names, undo llama.cpp's q/k RoPE permutation
                       ──▶ model.safetensors
    transformers' GGUF tokenizer conversion ──▶ tokenizer.json, tokenizer_config.json (chat_template)
    disagg-conversion.json (source path, size, mtime, converter version), written last

Everything is written into a temporary sibling folder that is renamed into place only when complete, so
an interrupted conversion never leaves a folder that looks valid. `is_conversion_current` compares the
marker with the source file; a missing or stale marker means "convert again".

transformers is a conversion-time dependency only (for the tokenizer) and is imported lazily.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from rich.progress import Progress, TimeElapsedColumn
from safetensors.torch import save_file

from services.core.errors import ModelLoadError

CONVERTER_VERSION = 1  # bump when the output of a conversion changes; cached folders are then redone
MARKER_FILE = "disagg-conversion.json"
WEIGHTS_FILE = "model.safetensors"

# GGUF name → HF name. Per-layer names are "blk.{i}.<key>.weight" → "model.layers.{i}.<value>.weight".
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Errors the gguf reader raises on truncated or corrupt files (it reports most as ValueError).
_READ_ERRORS = (ValueError, OSError, IndexError, KeyError, TypeError)


def convert_gguf(gguf_path: Path, out_dir: Path, *, show_progress: bool = True) -> Path:
    """Convert `gguf_path` into the HF folder `out_dir` (replacing it if present); returns `out_dir`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    columns = (*Progress.get_default_columns(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task(f"Reading {gguf_path.name}", total=None)
        reader = _open_reader(gguf_path)
        config = _hf_config(reader, gguf_path)
        progress.update(task, total=len(reader.tensors) + 1, description=f"Converting {gguf_path.name}")
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            _write_json(tmp / "config.json", config)
            _write_json(tmp / "generation_config.json", _generation_config(config))
            tensors = _convert_tensors(reader, config, gguf_path, lambda: progress.advance(task))
            progress.update(task, description=f"Writing {WEIGHTS_FILE}")
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            shutil.copymode(tmp / "config.json", tmp / WEIGHTS_FILE)  # safetensors writes 0600; keep umask
            del tensors
            progress.update(task, advance=1, description=f"Converted {gguf_path.name}")
            tokenizer_task = progress.add_task("Converting the tokenizer", total=None)
            _convert_tokenizer(gguf_path, tmp, config)
            progress.update(tokenizer_task, total=1, completed=1, description="Converted the tokenizer")
            _write_json(tmp / MARKER_FILE, conversion_marker(gguf_path))  # last: it certifies the rest
            _move_into_place(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def conversion_marker(gguf_path: Path) -> dict[str, Any]:
    """What `disagg-conversion.json` records: enough to notice that the source or the converter changed."""
    stat = gguf_path.stat()
    return {
        "source": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }


def is_conversion_current(out_dir: Path, gguf_path: Path) -> bool:
    """True when `out_dir` holds a finished conversion of exactly this `gguf_path` by this converter."""
    try:
        recorded = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    outputs = (WEIGHTS_FILE, "config.json", "tokenizer.json", "tokenizer_config.json")
    return recorded == conversion_marker(gguf_path) and all((out_dir / name).is_file() for name in outputs)


def _open_reader(gguf_path: Path) -> GGUFReader:
    try:
        return GGUFReader(gguf_path)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{gguf_path} does not exist; check the path") from exc
    except _READ_ERRORS as exc:
        raise ModelLoadError(
            f"{gguf_path} is not a readable GGUF file ({exc}); it is probably truncated or corrupt: "
            "download it again (or reinstall the package that ships it)"
        ) from exc


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _hf_config(reader: GGUFReader, gguf_path: Path) -> dict[str, Any]:
    """config.json contents from `llama.*` and `tokenizer.ggml.*` metadata (as transformers reads them)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"{gguf_path} has architecture {arch!r}; only llama-architecture GGUF files can be converted "
            "(for other models pass a Hugging Face folder with safetensors)"
        )
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ModelLoadError(
            f"{gguf_path} uses RoPE scaling {scaling!r}, which the GGUF converter does not carry over; "
            "pass the original Hugging Face folder instead"
        )
    try:
        hidden = int(_field(reader, "llama.embedding_length"))
        heads = int(_field(reader, "llama.attention.head_count"))
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
            "num_hidden_layers": int(_field(reader, "llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
            "head_dim": int(_field(reader, "llama.attention.key_length", hidden // heads)),
            "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
            "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(_field(reader, "llama.context_length")),
            "vocab_size": int(
                _field(reader, "llama.vocab_size", len(_field(reader, "tokenizer.ggml.tokens", [])))
            ),
            "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
            "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
    except TypeError as exc:  # int(None): a required key is absent
        raise ModelLoadError(
            f"{gguf_path} lacks required llama metadata ({exc}); "
            "re-create it with llama.cpp's convert_hf_to_gguf.py"
        ) from exc
    return config


def _convert_tensors(
    reader: GGUFReader, config: dict[str, Any], gguf_path: Path, on_tensor: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """Every GGUF tensor as an fp32 torch tensor under its HF name, `[out, in]` for matrices."""
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, gguf_path)
        array = _dequantize(tensor, gguf_path)
        if name.endswith("self_attn.q_proj.weight"):
            array = _unpermute_rope(array, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            array = _unpermute_rope(array, config["num_key_value_heads"])
        # np.require copies only the read-only memory-mapped fp32 tensors (norms)
        tensors[name] = torch.from_numpy(np.require(array, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        on_tensor()
    return tensors


def _hf_name(gguf_name: str, gguf_path: Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise ModelLoadError(
        f"{gguf_path} holds tensor {gguf_name!r}, which a plain Llama model does not have "
        "(Llama 3.1 rope_freqs or an unsupported variant); convert the original Hugging Face model instead"
    )


def _dequantize(tensor: ReaderTensor, gguf_path: Path) -> np.ndarray:
    """gguf stores shapes innermost-first; the dequantized array is reshaped to `[out, in]`."""
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"{gguf_path}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which gguf "
            f"cannot dequantize ({exc}); use a GGUF with a common quantization (F16, Q8_0, Q4_K, ...)"
        ) from exc
    return array.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves: HF keeps [first half | second half]."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(n_head * head_dim, -1)


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if config[key] is not None}


def _convert_tokenizer(gguf_path: Path, out_dir: Path, config: dict[str, Any]) -> None:
    """transformers' own GGUF tokenizer conversion; the chat template goes into tokenizer_config.json."""
    from transformers import AutoTokenizer  # conversion-time dependency only

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(
            f"{gguf_path}: its tokenizer could not be converted ({exc}); "
            "use a GGUF made by a recent llama.cpp"
        ) from exc
    tokenizer.model_max_length = config["max_position_embeddings"]
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    if not (out_dir / "tokenizer.json").is_file():
        raise ModelLoadError(f"{gguf_path}: the tokenizer conversion wrote no tokenizer.json")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Swap `tmp` in for `out_dir`; a concurrent converter that got there first wins (same content)."""
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
    if out_dir.exists():
        out_dir.rename(old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not out_dir.is_dir():
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
