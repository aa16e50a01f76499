"""What every pod process shares: settings from flags and environment, the gRPC server with health,
registration in Redis, and running until SIGTERM.

    parser = add_settings_flags(subparsers.add_parser("prefill", ...), PrefillSettings)
    settings = settings_from_args(PrefillSettings, args, "prefill")       # flags win over env
    server = start_grpc_server(settings.host, settings.port, threads, max_bytes,
                               [(add_PrefillServicer_to_server, servicer)], ["disagg.v1.Prefill"])
    registration = PodRegistration.start(settings.redis_url, info, load=lambda: queued_tokens)
    wait_for_signal()                       # SIGTERM / SIGINT
    server.health.enter_graceful_shutdown(); ...; registration.stop(); server.stop(grace)

Registration is optional: with no Redis URL (flag `--redis-url`, else DISAGG_REDIS_URL) a pod
serves standalone, which is how single-pod tests and debugging run it. The address a pod registers
is where others reach it: the bind host, or DISAGG_POD_IP (Kubernetes downward API) when it binds
0.0.0.0, else this host's resolved name.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.errors import DisaggError
from services.core.metrics import MetricsServer, PodMetrics
from services.core.registry import Capacity, Heartbeater, PodInfo, PodRegistry, RedisSettings, Role, connect
from services.core.runtime import keep_freed_memory
from services.core.wire import grpc_message_options

log = logging.getLogger(__name__)

S = TypeVar("S", bound=BaseSettings)
POD_IP_ENV = "DISAGG_POD_IP"


# ---- settings -----------------------------------------------------------------------------------
def pod_id_default() -> str:
    """The hostname (a Kubernetes pod name) plus the pid, so local pods on one host differ."""
    return f"{socket.gethostname()}-{os.getpid()}"


class PodSettings(BaseSettings):
    """The settings every gRPC pod has; each role's class adds its own (and its env prefix)."""

    model_config = SettingsConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 in a cluster")
    pod_id: str = Field(default_factory=pod_id_default, min_length=1, description="for logs, registry")
    redis_url: str | None = Field(
        None, description="Redis to register in (else DISAGG_REDIS_URL; none: standalone)"
    )
    max_message_bytes: int = Field(64 << 20, ge=1 << 20, le=(1 << 31) - 1, description="per gRPC message")
    torch_threads: int = Field(
        0, ge=0, le=1024, description="torch intra-op threads (0: torch's default, one per core)"
    )
    cost_usd_per_hour: float = Field(
        0.0, ge=0, le=1e6, description="this pod's price in USD/hour (cost accounting; 0: unpriced)"
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="port of Prometheus /metrics; 0 picks a free one (registered in Redis)"
    )


def add_settings_flags(
    parser: argparse.ArgumentParser, settings: type[BaseSettings]
) -> argparse.ArgumentParser:
    """One `--flag-name` per settings field, help from the field's description; unset flags are None."""
    for name, field in settings.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=field.description)
    return parser


def settings_from_args(settings: type[S], args: argparse.Namespace, role: str) -> S:
    """Flags given on the command line win over the environment; pydantic validates both."""
    given = {
        name: value for name in settings.model_fields if (value := getattr(args, name, None)) is not None
    }
    try:
        return settings(**given)
    except ValidationError as exc:
        raise DisaggError(f"invalid {role} pod settings: {exc}") from None


# ---- gRPC server with health --------------------------------------------------------------------
@dataclass(slots=True)
class GrpcPodServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int  # the bound port (the setting, or the one picked for port 0)

    def stop(self, grace_s: float) -> None:
        """NOT_SERVING first (routers stop sending), then open calls get `grace_s` before UNAVAILABLE."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait(grace_s + 5)


def start_grpc_server(
    host: str,
    port: int,
    *,
    threads: int,
    max_message_bytes: int,
    servicers: Sequence[tuple[Callable[[Any, grpc.Server], None], Any]],
    service_names: Sequence[str],
) -> GrpcPodServer:
    """A sync gRPC server (one thread per open call, calls past `threads` get RESOURCE_EXHAUSTED),
    with the standard health service SERVING for "" and each of `service_names`."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        options=[*grpc_message_options(max_message_bytes), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=threads,
    )
    for add, servicer in servicers:
        add(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise DisaggError(f"cannot listen on {host}:{port} ({exc}); pick another port") from exc
    server.start()
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcPodServer(server, health_servicer, bound)


# ---- errors to statuses -------------------------------------------------------------------------
# Most specific first: the first class an error is an instance of gives its status (or a function of
# the call's context that picks one).
StatusTable = Sequence[
    tuple[type[BaseException], grpc.StatusCode | Callable[[grpc.ServicerContext], grpc.StatusCode]]
]


def abort_with(context: grpc.ServicerContext, table: StatusTable, exc: BaseException) -> NoReturn:
    """End the call with the status `table` gives `exc` (INTERNAL if none) and its message."""
    code = next((code for kind, code in table if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
    context.abort(code if isinstance(code, grpc.StatusCode) else code(context), str(exc))
    raise AssertionError("unreachable: context.abort raises")


@contextmanager
def grpc_errors(context: grpc.ServicerContext, table: StatusTable, role: str) -> Iterator[None]:
    """Errors the table knows end the call with their status; anything else is a bug: INTERNAL with
    the exception named (instead of gRPC's anonymous UNKNOWN), and the traceback in the log."""
    known = tuple(kind for kind, _ in table)
    try:
        yield
    except known as exc:
        abort_with(context, table, exc)
    except Exception as exc:
        log.exception("%s pod failed a call", role)
        context.abort(grpc.StatusCode.INTERNAL, f"{role} pod bug: {type(exc).__name__}: {exc}")


# ---- Redis registration -------------------------------------------------------------------------
def advertised_address(host: str, port: int) -> str:
    """host:port where other pods reach this one (see the module docstring)."""
    if host in ("0.0.0.0", "::", ""):
        host = os.environ.get(POD_IP_ENV) or socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


def redis_url_or_env(url: str | None) -> str | None:
    """The pod's `--redis-url`, else DISAGG_REDIS_URL, else None (standalone: no registration)."""
    return url or os.environ.get("DISAGG_REDIS_URL") or None


class PodRegistration:
    """A pod's entry in the Redis registry, kept alive by heartbeats; `stop()` deregisters."""

    def __init__(self, heartbeater: Heartbeater | None) -> None:
        self._heartbeater = heartbeater

    @classmethod
    def start(
        cls,
        redis_url: str | None,
        *,
        pod_id: str,
        role: Role,
        address: str,
        model: str,
        capacity: Capacity,
        load: Callable[[], int],
        metrics_address: str = "",
    ) -> PodRegistration:
        url = redis_url_or_env(redis_url)
        if url is None:
            log.info("%s pod %s: no Redis URL, serving standalone (not registered)", role, pod_id)
            return cls(None)
        settings = RedisSettings(url=url)
        info = PodInfo(pod_id, role, address, model, capacity, time.time(), metrics_address)
        registry = PodRegistry(connect(settings), settings)
        log.info("%s pod %s: registering %s in %s", role, pod_id, address, url)
        return cls(Heartbeater(registry, info, load).start())

    @property
    def registered(self) -> bool:
        return self._heartbeater is not None

    @property
    def registry(self) -> PodRegistry | None:
        return self._heartbeater.registry if self._heartbeater is not None else None

    def stop(self) -> None:
        if self._heartbeater is not None:
            self._heartbeater.stop(deregister=True)
            self._heartbeater = None


def serve_pod_metrics(metrics: PodMetrics, settings: PodSettings) -> tuple[MetricsServer, str]:
    """Serve /metrics on the pod's host and `metrics_port`; returns the server and the address to
    register (where Prometheus reaches it)."""
    server = metrics.serve(settings.host, settings.metrics_port)
    address = advertised_address(settings.host, server.port)
    log.info("pod %s: Prometheus metrics at http://%s/metrics", settings.pod_id, address)
    return server, address


# ---- process lifecycle --------------------------------------------------------------------------
def wait_for_signal(poll_s: float = 0.5) -> int:
    """Block the main thread until SIGTERM or SIGINT; returns the signal number."""
    got: list[int] = []
    stopping = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        got.append(signum)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    while not stopping.wait(poll_s):
        pass
    return got[0]


def pod_main(
    role: str,
    settings: type[S],
    serve: Callable[[S], None],
    argv: Sequence[str] | None = None,
) -> int:
    """The whole command line of a pod: flags (one per settings field, each also read from the
    environment), logging, process tuning, then `serve(settings)`; errors a user can fix exit 2."""
    parser = argparse.ArgumentParser(
        prog=f"disagg serve {role}",
        description=f"Serve one {role} pod until SIGTERM. Flags also read DISAGG_{role.upper()}_<FLAG>.",
    )
    add_settings_flags(parser, settings)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    try:
        resolved = settings_from_args(settings, args, role)
        threads = getattr(resolved, "torch_threads", 0)
        if threads:
            torch.set_num_threads(threads)
        serve(resolved)
    except DisaggError as exc:
        print(f"disagg serve {role}: error: {exc}", file=sys.stderr)
        return 2
    return 0
