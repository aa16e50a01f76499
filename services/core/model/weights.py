"""Load a model's weights from the safetensors files of a Hugging Face folder, checked against its config.

Names are Hugging Face's (Llama, Mistral and Qwen2 share them; Qwen2 adds q/k/v biases):

    model.embed_tokens.weight                       [V, d]
    model.layers.{i}.input_layernorm.weight         [d]
    model.layers.{i}.self_attn.q_proj.weight        [Hq·D, d]    (+ .bias [Hq·D] with attention_bias)
    model.layers.{i}.self_attn.k_proj.weight        [Hkv·D, d]   (+ .bias [Hkv·D])
    model.layers.{i}.self_attn.v_proj.weight        [Hkv·D, d]   (+ .bias [Hkv·D])
    model.layers.{i}.self_attn.o_proj.weight        [d, Hq·D]
    model.layers.{i}.post_attention_layernorm.weight [d]
    model.layers.{i}.mlp.{gate,up}_proj.weight      [I, d]
    model.layers.{i}.mlp.down_proj.weight           [d, I]
    model.norm.weight                               [d]
    lm_head.weight                                  [V, d]       (the embedding itself when tied)

Every expected tensor must be present with its expected shape; tensors the model does not use (e.g. an
old checkpoint's rotary inv_freq) are ignored without being read.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from services.core.errors import ModelLoadError
from services.core.model.config import ModelConfig

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass needs, by HF name, with its shape (lm_head only when untied)."""
    d, inter = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, d)
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (d,),
            layer + "self_attn.q_proj.weight": (q_out, d),
            layer + "self_attn.k_proj.weight": (kv_out, d),
            layer + "self_attn.v_proj.weight": (kv_out, d),
            layer + "self_attn.o_proj.weight": (d, q_out),
            layer + "post_attention_layernorm.weight": (d,),
            layer + "mlp.gate_proj.weight": (inter, d),
            layer + "mlp.up_proj.weight": (inter, d),
            layer + "mlp.down_proj.weight": (d, inter),
        }
        if config.attention_bias:
            shapes |= {
                layer + "self_attn.q_proj.bias": (q_out,),
                layer + "self_attn.k_proj.bias": (kv_out,),
                layer + "self_attn.v_proj.bias": (kv_out,),
            }
    return shapes


def load_weights(
    folder: Path, config: ModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """All weights of the model in `folder` (every *.safetensors shard), as `dtype` on `device`.

    With tied embeddings `lm_head.weight` is the embedding tensor itself (same object), as in HF.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no *.safetensors file; pass a folder with the model's weights")
    shapes = expected_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        weights |= _load_file(path, shapes, weights.keys(), dtype, device)
    missing = [name for name in shapes if name not in weights]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(
            f"{folder} lacks tensor(s) {', '.join(missing[:5])}{more}; the safetensors files are incomplete "
            "or belong to another model: re-download or re-convert it"
        )
    if config.tie_word_embeddings:
        weights[LM_HEAD] = weights[EMBEDDING]
    return weights


def _load_file(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    already: Container[str],
    dtype: torch.dtype,
    device: str,
) -> dict[str, torch.Tensor]:
    """The expected tensors found in one safetensors file, shape-checked and converted."""
    loaded: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if name not in shapes:
                    continue
                if name in already:
                    raise ModelLoadError(f"tensor {name} appears in more than one file (again in {path})")
                tensor = handle.get_tensor(name)
                if tuple(tensor.shape) != shapes[name]:
                    raise ModelLoadError(
                        f"{path}: tensor {name} has shape {tuple(tensor.shape)}, but config.json implies "
                        f"{shapes[name]}; config.json and the weights belong to different models"
                    )
                loaded[name] = tensor.to(device=device, dtype=dtype)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}); re-download it") from exc
    return loaded
