"""The dense part of a Llama-family model: every weight, no KV cache.

One forward over N new tokens (any mix of prefill chunks and decode rows):

    x = embed(tokens)                                   # [N, d]
    for each layer:
        h = rms_norm(x)
        q, k, v = split(h @ Wqkv^T (+ b))               # [N,Hq,D], [N,Hkv,D], [N,Hkv,D]
        q, k = rope(q, positions), rope(k, positions)
        o = attention.attend(layer, q, k, v)            # the attention part (local or remote)
        x = x + o @ Wo^T
        h = rms_norm(x)
        x = x + (silu(h @ Wg^T) * (h @ Wu^T)) @ Wd^T
    logits = rms_norm(x) @ W_lm^T                       # only for rows that sample

The arithmetic follows transformers' LlamaModel op for op (fp32 RMSNorm, cos/sin tables built from
the same float32 products) so that greedy output matches it token for token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.core.attention import AttentionStep
from services.core.model.config import ModelConfig, RopeScaling
from services.core.model.linear import Linear, LinearKernel, best_kernel


@dataclass(slots=True, frozen=True)
class MicroBatchInput:
    """The rows of one micro-batch and the attention step that serves them."""

    tokens: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    step: AttentionStep


@dataclass(slots=True)
class _InFlight:
    """A micro-batch between layers."""

    x: torch.Tensor  # [N, d] residual stream
    cos: torch.Tensor  # [N, 1, D] RoPE tables at its positions
    sin: torch.Tensor
    step: AttentionStep


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [d]
    qkv: Linear  # [(Hq + 2 Hkv) D, d]  q, k and v projections stacked (+ bias on Qwen2)
    o: Linear  # [d, Hq D]
    post_norm: torch.Tensor  # [d]
    gate_up: Linear  # [2 I, d]  gate and up projections stacked
    down: Linear  # [d, I]


class DenseModel:
    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], kernel: LinearKernel | None = None
    ) -> None:
        self.config = config
        self.embed = weights["model.embed_tokens.weight"]  # [V, d]
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.kernel = kernel or best_kernel(self.device, self.dtype)
        self.lm_head = Linear(weights.get("lm_head.weight", self.embed), None, self.kernel)  # [V, d]
        self.final_norm = weights["model.norm.weight"]
        self.layers = [_layer_weights(weights, i, config, self.kernel) for i in range(config.num_layers)]
        cos, sin = rope_tables(config, self.device)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)  # [max_pos, D]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        """tokens, positions: [N] int64 -> final hidden states [N, d] (before the final norm)."""
        return self.forward_micro_batches([MicroBatchInput(tokens, positions, step)])[0]

    @torch.inference_mode()
    def forward_micro_batches(self, batches: Sequence[MicroBatchInput]) -> list[torch.Tensor]:
        """Ping-pong: the forward of several micro-batches, interleaved layer by layer, so that the
        attention of one runs (on the attention part) while the dense part computes another.

            dense:      A.qkv0 B.qkv0 │ A.out0 A.qkv1 │ B.out0 B.qkv1 │ A.out1 A.qkv2 │ ...
            attention:      A0 ─────────▶ B0 ──────────▶ A1 ──────────▶ B1 ───▶ ...

        With one micro-batch this is the plain sequential forward. Returns [N_i, d] per batch.
        """
        running = [self._embed(b) for b in batches]
        last = len(self.layers) - 1
        pending = [mb.step.submit(0, *self._before_attention(0, mb)) for mb in running]
        for index in range(1, last + 1):
            for i, mb in enumerate(running):
                self._after_attention(index - 1, mb, pending[i]())
                pending[i] = mb.step.submit(index, *self._before_attention(index, mb))
        for mb, result in zip(running, pending, strict=True):
            self._after_attention(last, mb, result())
        return [mb.x for mb in running]

    def _embed(self, batch: MicroBatchInput) -> _InFlight:
        x = F.embedding(batch.tokens, self.embed)  # [N, d]
        cos = self.cos.index_select(0, batch.positions).unsqueeze(1)  # [N, 1, D]
        sin = self.sin.index_select(0, batch.positions).unsqueeze(1)
        return _InFlight(x, cos, sin, batch.step)

    def _before_attention(self, index: int, mb: _InFlight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N,Hq,D], k [N,Hkv,D], v [N,Hkv,D] of layer `index` (RoPE applied)."""
        cfg, w = self.config, self.layers[index]
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        h = rms_norm(mb.x, w.input_norm, cfg.rms_norm_eps)
        qkv = w.qkv(h)  # [N, (Hq + 2 Hkv) D]
        q = qkv[:, :q_dim].view(-1, cfg.num_heads, cfg.head_dim)
        k = qkv[:, q_dim : q_dim + kv_dim].view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, q_dim + kv_dim :].view(-1, cfg.num_kv_heads, cfg.head_dim)
        return apply_rope(q, mb.cos, mb.sin), apply_rope(k, mb.cos, mb.sin), v.contiguous()

    def _after_attention(self, index: int, mb: _InFlight, o: torch.Tensor) -> None:
        """O projection and MLP of layer `index`, given its attention output o [N, Hq, D]."""
        cfg, w = self.config, self.layers[index]
        x = mb.x + w.o(o.reshape(-1, cfg.num_heads * cfg.head_dim))
        h = rms_norm(x, w.post_norm, cfg.rms_norm_eps)
        gate, up = w.gate_up(h).chunk(2, dim=-1)
        mb.x = x + w.down(F.silu(gate) * up)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [M, d] -> logits [M, V] in fp32."""
        h = rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)
        return self.lm_head(h).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, D]; cos, sin: [N, 1, D]. Rotates the two halves of D (HF's rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_tables(config: ModelConfig, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position of the context window: [max_pos, D] each, float32."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # [D/2]
    if config.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float)
    freqs = positions[:, None] * inv_freq[None, :]  # [max_pos, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _llama3_scaled(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 frequency scaling, as in transformers' `_compute_llama3_parameters`."""
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _layer_weights(
    weights: dict[str, torch.Tensor], i: int, config: ModelConfig, kernel: LinearKernel
) -> LayerWeights:
    p = f"model.layers.{i}."
    qkv = torch.cat([weights[f"{p}self_attn.{n}_proj.weight"] for n in ("q", "k", "v")])
    bias = None
    if config.attention_bias:
        bias = torch.cat([weights[f"{p}self_attn.{n}_proj.bias"] for n in ("q", "k", "v")])
    gate_up = torch.cat([weights[f"{p}mlp.gate_proj.weight"], weights[f"{p}mlp.up_proj.weight"]])
    return LayerWeights(
        input_norm=weights[f"{p}input_layernorm.weight"],
        qkv=Linear(qkv, bias, kernel),
        o=Linear(weights[f"{p}self_attn.o_proj.weight"], None, kernel),
        post_norm=weights[f"{p}post_attention_layernorm.weight"],
        gate_up=Linear(gate_up, None, kernel),
        down=Linear(weights[f"{p}mlp.down_proj.weight"], None, kernel),
    )
