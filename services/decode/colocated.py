"""The colocated engine: dense part and attention part in one process (the baseline)."""

from __future__ import annotations

from services.attention.kernels import paged_cpu
from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention
from services.core.attention import DEFAULT_POLICY, PolicySpec
from services.core.model.load import LoadedModel
from services.decode.engine import Engine
from services.decode.metering import StepMeter
from services.decode.scheduler import SchedulerConfig

DEFAULT_KV_BUDGET_BYTES = 2 << 30  # 2 GiB: ~46K tokens of SmolLM2-135M at fp32 (46 KiB per token)


def build_engine(
    model: LoadedModel,
    *,
    kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
    block_size: int = 16,
    scheduler: SchedulerConfig | None = None,
    meter: StepMeter | None = None,
    default_policy: PolicySpec = DEFAULT_POLICY,
) -> Engine:
    """`default_policy` serves requests that name no attention policy; its budget is the budget of
    a policy named without one."""
    cfg = model.config
    pool_config = KVPoolConfig(
        num_layers=cfg.num_layers,
        head_dim=cfg.head_dim,
        block_size=block_size,
        dtype=model.dense.dtype,
        device=str(model.dense.device),
    )
    pool = KVPool.from_budget(pool_config, kv_budget_bytes)
    paged_cpu.warm_up(pool.k[0])
    attention = LocalAttention(pool, cfg.num_kv_heads, cfg.num_heads, default_policy=default_policy)
    config = scheduler or SchedulerConfig(max_model_len=cfg.max_position_embeddings)
    return Engine(model.dense, attention, model.tokenizer, config, meter=meter)
