"""Gateway settings: environment variables `DISAGG_GATEWAY_*`, overridden by command-line flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.policy import DEFAULT_BUDGET, PolicyName


def _pod_id() -> str:
    """The hostname (a Kubernetes pod name) plus the pid, as pods name themselves."""
    return f"{socket.gethostname()}-{os.getpid()}"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISAGG_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)  # 0 = pick a free port (the ready line prints it)
    # Model ids clients may send (JSON list in the environment); empty = the backend's model name.
    served_model_names: list[str] = Field(default_factory=list)
    request_timeout_seconds: float = Field(default=600.0, gt=0)  # past it: cancel, 504
    max_concurrent_requests: int = Field(default=256, ge=1)  # more at once: 503 no_capacity
    # /v1/completions without max_tokens gets OpenAI's default (16); chat gets the rest of the context.
    default_max_tokens: int = Field(default=16, ge=1)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)  # in-flight requests may finish within it
    log_level: str = "info"
    cost_usd_per_hour: float = Field(default=0.0, ge=0, le=1e6)  # the gateway's own price (cost accounting)
    pod_id: str = Field(default_factory=_pod_id, min_length=1)  # the `pod` label of its metrics
    # --colocated only (in the cluster the attention pods hold these defaults): the decode attention
    # policy of requests that name none, and the budget of a policy named without one.
    default_attention_policy: PolicyName = PolicyName.DENSE
    default_attention_budget: float = Field(default=DEFAULT_BUDGET, gt=0)
    # Tenants and API keys (docs/tenants.md). Redis for them: the cluster's; with --colocated this one,
    # if set (else the gateway is single-tenant: everything is tenant `default`).
    tenants_redis_url: str | None = None
    # `TENANT:KEY` per line, imported into Redis at start; the gateway then always requires a key.
    api_keys_file: Path | None = None
    # How long "do keys exist", a key's tenant and a tenant's limits are cached: a revoked key or a
    # changed limit takes effect within this many seconds.
    auth_cache_seconds: float = Field(default=1.0, ge=0, le=10)
