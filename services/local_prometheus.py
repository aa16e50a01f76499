"""A real Prometheus (Debian's `prometheus` binary) scraping a local cluster: `disagg up --prometheus`.

    prometheus = LocalPrometheus(["127.0.0.1:8000", "127.0.0.1:41234", ...], scrape_interval_s=2)
    url = prometheus.start()         # returns once every target was scraped: http://127.0.0.1:PORT
    prometheus.query("up")           # PromQL over /api/v1/query: the result vector
    prometheus.stop()                # SIGTERM, SIGKILL after 10 s; its data folder is removed

It loads the same recording rules the Helm chart ships (deploy/helm/disagg/rules/*.yaml), scrapes
every target's /metrics with `honor_labels: true` (the metrics carry role, pod and model), and
evaluates rules as often as it scrapes. Targets come from a file_sd file, so `set_targets` can
change them while it runs. The process runs in its own session with PR_SET_PDEATHSIG, like the
cluster's pods; its log goes to a file in its data folder and is quoted when it fails to start.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from services.core.errors import DisaggError
from services.core.runtime import die_with_parent

log = logging.getLogger(__name__)

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "disagg" / "rules"
INSTALL_HINT = "install Debian's prometheus (`apt-get install -y prometheus`; `make setup` does as root)"


class LocalPrometheus:
    def __init__(
        self,
        targets: Sequence[str],
        *,
        scrape_interval_s: float = 2.0,
        rules_dir: Path = RULES_DIR,
        port: int = 0,
        ready_timeout_s: float = 60.0,
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise DisaggError(f"--prometheus needs the prometheus binary on PATH; {INSTALL_HINT}")
        if not sorted(rules_dir.glob("*.yaml")):
            raise DisaggError(f"no recording rules (*.yaml) in {rules_dir}; run from a disagg checkout")
        if scrape_interval_s < 0.5:
            raise DisaggError(f"a scrape interval of {scrape_interval_s} s is too short (>= 0.5 s)")
        self.binary = binary
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.rules_dir = rules_dir
        self.port = port
        self.ready_timeout_s = ready_timeout_s
        self.url = ""
        self._folder: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> str:
        """Write the config, start Prometheus and wait until it has scraped every target once (so
        that counters have a sample before the first request: rate() needs it); returns its URL."""
        self._folder = Path(tempfile.mkdtemp(prefix="disagg-prometheus-"))
        self.set_targets(self.targets)
        config = self._folder / "prometheus.yml"
        config.write_text(json.dumps(self._config(), indent=2))  # JSON is YAML
        port = self.port or _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = (self._folder / "prometheus.log").open("wb")
        argv = [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self._folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        self._proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            self._wait_ready()
            self._wait_scraped()
        except BaseException:
            self.stop()
            raise
        log.info(
            "Prometheus at %s scraping %d targets every %g s",
            self.url,
            len(self.targets),
            self.scrape_interval_s,
        )
        return self.url

    def set_targets(self, targets: Sequence[str]) -> None:
        """Replace the scraped host:port list (Prometheus re-reads the file within seconds)."""
        if self._folder is None:
            raise DisaggError("start() the local Prometheus first")
        self.targets = list(targets)
        temporary = self._folder / "targets.json.tmp"
        temporary.write_text(json.dumps([{"targets": self.targets, "labels": {}}]))
        temporary.replace(self._folder / "targets.json")  # atomic: never a half-written file

    def query(self, expr: str) -> list[dict[str, Any]]:
        return query(self.url, expr)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _config(self) -> dict[str, Any]:
        assert self._folder is not None  # set by start
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": f"{int(self.scrape_interval_s * 800)}ms",
                "evaluation_interval": interval,
            },
            "rule_files": [str(path) for path in sorted(self.rules_dir.glob("*.yaml"))],
            "scrape_configs": [
                {
                    "job_name": "disagg",
                    "honor_labels": True,
                    "file_sd_configs": [
                        {"files": [str(self._folder / "targets.json")], "refresh_interval": "1s"}
                    ],
                }
            ],
        }

    def _wait_ready(self) -> None:
        assert self._proc is not None  # set by start
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DisaggError(f"prometheus exited with code {self._proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise DisaggError(f"prometheus not ready after {self.ready_timeout_s:.0f} s:\n{self._log_tail()}")

    def _wait_scraped(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            up = self.query("up == 1")
            if len(up) >= len(self.targets):
                return
            time.sleep(0.1)
        raise DisaggError(f"prometheus did not scrape all {len(self.targets)} targets:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        if self._folder is None:
            return ""
        lines = (self._folder / "prometheus.log").read_text(errors="replace").splitlines()
        return "\n".join(f"    {line}" for line in lines[-15:])


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query of the Prometheus at `url`: the result's samples (a scalar as one sample
    without labels), or DisaggError with Prometheus's reason."""
    try:
        with urllib.request.urlopen(
            f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10
        ) as r:
            body = json.load(r)
    except urllib.error.HTTPError as exc:  # 400/422: a bad expression; the body says why
        body = json.load(exc)
    if body.get("status") != "success":
        raise DisaggError(f"Prometheus refused {expr!r}: {body.get('error', body)}")
    result = body["data"]["result"]
    return result if isinstance(result, list) else [{"metric": {}, "value": result}]


def _free_port() -> int:
    """A port free now (Prometheus cannot report a port it picked itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


__all__ = ["INSTALL_HINT", "RULES_DIR", "LocalPrometheus", "query"]
