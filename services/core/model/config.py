"""Model architecture as read from a Hugging Face `config.json` (Llama, Qwen2, Mistral)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`); absent means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int  # d
    intermediate_size: int  # MLP width
    num_layers: int
    num_heads: int  # Hq
    num_kv_heads: int  # Hkv; Hq % Hkv == 0 (GQA group G = Hq / Hkv)
    head_dim: int  # D
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int  # the context window
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: RopeScaling | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"architecture {arch!r} is not supported; disagg serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            cfg = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rope_theta=float(raw.get("rope_theta") or _rope_parameters(raw).get("rope_theta", 10000.0)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=_context_window(raw, arch),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
                rope_scaling=_rope_scaling(raw),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad field: {exc}") from exc
        if cfg.num_heads % cfg.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {cfg.num_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_kv_heads}"
            )
        return cfg

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = folder / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{path} not found: a model folder needs config.json") from exc
        except json.JSONDecodeError as exc:
            raise ModelLoadError(
                f"{path} is not valid JSON ({exc}); re-download or re-convert the model"
            ) from exc
        return cls.from_dict(raw)


def _context_window(raw: dict[str, Any], arch: str) -> int:
    """Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) is served as full
    attention, which is exact only inside the window, so the window caps the context."""
    window = int(raw.get("max_position_embeddings", 2048))
    sliding = raw.get("sliding_window")
    uses_sliding = arch == "MistralForCausalLM" or bool(raw.get("use_sliding_window"))
    if sliding and uses_sliding:
        window = min(window, int(sliding))
    return window


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 moved rope settings into `rope_parameters`; 4.x kept `rope_scaling`."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return params if isinstance(params, dict) else {}


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling | None:
    params = _rope_parameters(raw)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelLoadError(f"rope scaling {kind!r} is not supported (only default and llama3)")
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
