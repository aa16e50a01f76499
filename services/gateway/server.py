"""Run the gateway under uvicorn.

    python -m services.gateway.server --colocated --model smollm2-135m --port 0      # one process
    python -m services.gateway.server --redis-url redis://HOST:6379/0 --port 8000      # the cluster
    python -m services.gateway.server --colocated --redis-url redis://HOST:6379/0      # + API keys

Lifecycle: load the model and start the backend, connect tenants (API keys and limits in Redis: the
cluster's, or --redis-url with --colocated; import DISAGG_GATEWAY_API_KEYS_FILE) -> bind the socket
(port 0 picks a free one) -> serve, and print one line `ready: http://HOST:PORT` once requests are
served -> on SIGTERM or Ctrl-C: stop accepting (new requests get 503, /health turns 503), let
in-flight requests finish for `shutdown_grace_seconds`, then end the rest with a 503 "shutting down"
error (an SSE error event for streams) -> stop the backend and exit 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from services.core.api_keys import ApiKeyStore
from services.core.errors import DisaggError
from services.core.model.sources import DEFAULT_MODEL
from services.core.registry import RedisSettings, connect
from services.core.runtime import keep_freed_memory
from services.core.tenants import TenantStore
from services.gateway.app import Gateway, create_app
from services.gateway.auth import Tenancy, read_keys_file
from services.gateway.backend import Backend
from services.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from services.gateway.cluster import ClusterBackend

log = logging.getLogger(__name__)

EXIT_USAGE = 2
FORCED_EXIT_MARGIN_S = 5.0  # after the grace period, aborted requests get this long to send their error


def print_ready(url: str) -> None:
    print(f"ready: {url}", flush=True)


def serve(
    settings: GatewaySettings,
    backend: Backend,
    on_ready: Callable[[str], None] = print_ready,
    tenancy: Tenancy | None = None,
) -> None:
    """Serve `backend` until SIGTERM/SIGINT; starts and stops the backend. Blocks."""
    app = create_app(backend, settings, tenancy)
    sock = _bind(settings.host, settings.port)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        lifespan="off",  # the backend's lifetime is managed here, around the server
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds + FORCED_EXIT_MARGIN_S),
    )
    server = _Server(config, app.state.gateway, settings.shutdown_grace_seconds)
    # uvicorn re-raises the signal it handled once it has shut down; make that a no-op so that the
    # backend below stops cleanly and the process exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    backend.start()
    try:
        asyncio.run(_run(server, sock, url, on_ready))
    finally:
        backend.stop()
        sock.close()
        if tenancy is not None:
            tenancy.close()


def build_tenancy(settings: GatewaySettings, cluster_redis: RedisSettings | None) -> Tenancy:
    """Tenants in `settings.tenants_redis_url`, else the cluster's Redis; none: single tenant."""
    bootstrap = read_keys_file(settings.api_keys_file) if settings.api_keys_file else []
    redis_settings = (
        RedisSettings(url=settings.tenants_redis_url) if settings.tenants_redis_url else cluster_redis
    )
    if redis_settings is None:
        if settings.api_keys_file:
            raise DisaggError(
                "an API keys file needs a Redis to hold the keys: pass --redis-url with --colocated "
                "(or set DISAGG_GATEWAY_TENANTS_REDIS_URL)"
            )
        log.info("no Redis for tenants: single tenant `default`, no API keys")
        return Tenancy.single_tenant()
    client = connect(redis_settings)
    tenancy = Tenancy(
        ApiKeyStore(client, redis_settings),
        TenantStore(client, redis_settings),
        cache_s=settings.auth_cache_seconds,
        bootstrap_keys=bootstrap,
        redis_url=redis_settings.url,
    )
    tenancy.bootstrap()
    return tenancy


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the gateway to drain when the first exit signal arrives."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, grace_s: float) -> None:
        super().__init__(config)
        self._gateway = gateway
        self._grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        if first and self._loop is not None:  # runs in a signal handler: hand over to the loop
            self._loop.call_soon_threadsafe(self._gateway.begin_shutdown, self._grace_s)


async def _run(
    server: uvicorn.Server, sock: socket.socket, url: str, on_ready: Callable[[str], None]
) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("uvicorn stopped before it started serving")
        await asyncio.sleep(0.02)
    on_ready(url)
    await task


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DisaggError(
            f"cannot listen on {host}:{port}: {exc}; pick another --port (0 = any free)"
        ) from exc
    sock.set_inheritable(True)
    return sock


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.gateway.server",
        description="Serve the OpenAI-compatible API. Flags override DISAGG_GATEWAY_* variables.",
    )
    p.add_argument(
        "--colocated",
        action="store_true",
        help="serve from one in-process engine with local attention (else: the cluster through Redis)",
    )
    p.add_argument(
        "--redis-url",
        help="the cluster's Redis (default: DISAGG_CLUSTER_REDIS_URL, else DISAGG_REDIS_URL, else "
        "redis://127.0.0.1:6379/0), which "
        "also holds tenants and API keys; with --colocated: a Redis for tenants and API keys only",
    )
    p.add_argument(
        "--api-keys-file",
        type=Path,
        help="TENANT:KEY per line, imported into Redis at start; keys are then required "
        "(DISAGG_GATEWAY_API_KEYS_FILE)",
    )
    p.add_argument(
        "--placement",
        choices=["request", "head"],
        help="KV placement: all heads of a request on one attention pod (default), or split across pods",
    )
    p.add_argument("--max-attention-pods", type=int, help="attention pods one request's heads spread over")
    p.add_argument(
        "--remote-prefill-min-tokens",
        type=int,
        help="prompts of at least this many tokens go to a prefill pod, shorter ones are prefilled by "
        "their decode pod (default 512; 2 sends every prompt to a prefill pod)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", action="append", help="model id clients send (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument(
        "--kv-budget-gb", type=float, default=2.0, help="KV cache memory budget in GiB (--colocated)"
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 = any free port)")
    p.add_argument("--request-timeout", type=float, dest="request_timeout_seconds", help="seconds")
    p.add_argument("--max-concurrent-requests", type=int, help="more at once get 503")
    p.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_seconds", help="seconds")
    p.add_argument("--cost-usd-per-hour", type=float, help="the gateway's own price (cost accounting)")
    p.add_argument(
        "--attention-policy",
        dest="default_attention_policy",
        help="--colocated: attention policy of requests naming none (dense, sink_window, heavy_hitter, "
        "sparq, quest; default dense)",
    )
    p.add_argument(
        "--attention-budget",
        type=float,
        dest="default_attention_budget",
        help="--colocated: fraction of dense K/V bytes per decode step for a policy without a budget",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    names = (
        "host",
        "port",
        "request_timeout_seconds",
        "max_concurrent_requests",
        "shutdown_grace_seconds",
        "cost_usd_per_hour",
        "default_attention_policy",
        "default_attention_budget",
        "api_keys_file",
    )
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.colocated and args.redis_url:
        overrides["tenants_redis_url"] = args.redis_url
    if args.served_model_name:
        overrides["served_model_names"] = args.served_model_name
    return GatewaySettings(**overrides)


def colocated_backend(args: argparse.Namespace, settings: GatewaySettings) -> Backend:
    """The whole engine in this process, which carries the gateway's price (docs/cost.md)."""
    from services.core.attention import PolicySpec
    from services.core.model.load import load_model, parse_dtype
    from services.gateway.backend import ColocatedBackend

    model = load_model(args.model, dtype=parse_dtype(args.dtype), device=args.device, show_progress=False)
    log.info("loaded %s from %s in %.1f s", args.model, model.folder, model.load_seconds)
    policy = PolicySpec(settings.default_attention_policy, settings.default_attention_budget)
    return ColocatedBackend(
        model,
        model_name=args.model,
        kv_budget_bytes=int(args.kv_budget_gb * (1 << 30)),
        cost_usd_per_hour=settings.cost_usd_per_hour,
        default_policy=policy,
    )


def cluster_backend(args: argparse.Namespace) -> ClusterBackend:
    """The gateway in front of the pods: only the tokenizer and config.json are read, no weights."""
    from services.core.model.config import ModelConfig
    from services.core.model.sources import resolve_model
    from services.core.model.tokenizer import Tokenizer
    from services.gateway.cluster import ClusterBackend, ClusterSettings

    overrides = {
        name: value
        for name in ("redis_url", "placement", "max_attention_pods", "remote_prefill_min_tokens")
        if (value := getattr(args, name)) is not None
    }
    folder = resolve_model(args.model, show_progress=False)
    config = ModelConfig.from_folder(folder)
    tokenizer = Tokenizer.from_folder(folder, extra_eos_token_ids=config.eos_token_ids)
    return ClusterBackend(ClusterSettings(**overrides), tokenizer, config, args.model)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    try:
        settings = settings_from_args(args)
        log.info("gateway settings: %s", settings.model_dump())
        if args.colocated:
            backend: Backend = colocated_backend(args, settings)
            tenancy = build_tenancy(settings, None)
        else:
            cluster = cluster_backend(args)
            backend, tenancy = cluster, build_tenancy(settings, cluster.redis_settings)
        serve(settings, backend, tenancy=tenancy)
    except (DisaggError, ValidationError) as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
