"""The API as users run it, driven by the official `openai` client (and httpx for malformed requests),
against each way of serving it:

    colocated   `python -m services.gateway.server --colocated`: one process, local attention
    head        `disagg up --placement head`: valkey + 2 attention pods + prefill + decode + gateway,
                each request's KV heads split over both attention pods (Lamina)
    request     `disagg up --placement request`: the same cluster, each request on one attention pod

Greedy outputs are compared with transformers on the same GGUF weights: the response text must equal
`tokenizer.decode(reference_ids)`, and the streamed deltas must add up to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import torch

from services.core.model.tokenizer import Tokenizer
from services.core.registry import PodRegistry, RedisSettings, Role, connect
from services.proto import attention_pb2, attention_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m"
NEW_TOKENS = 24
RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Paris is the capital of",
    "1, 2, 3, 5, 8, 13,",
]
# Cluster modes: the raw prompts (< 16 tokens) are prefilled by the decode pod, the chat prompts and
# LONG_TEXT (system prompt included, > 16) by the prefill pod, so the exactness tests cover both paths.
REMOTE_PREFILL_MIN_TOKENS = 16
LONG_TEXT = (ROOT / "tests" / "data" / "alice_ch1.txt").read_text()[:1500]  # ~350 tokens
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]


@dataclass(slots=True, frozen=True)
class Case:
    prompt: str
    chat: bool
    prompt_ids: list[int]
    reference_ids: list[int]  # transformers' greedy continuation, a final EOS included
    text: str  # tokenizer.decode(reference_ids)


class Gateway:
    """A gateway (`colocated`) or a whole `disagg up` cluster (`head`, `request`; `-nixl` ships KV
    over NIXL) as a subprocess; stdout and stderr go to files so that no pipe can fill up and block it."""

    def __init__(
        self,
        cache: Path,
        logs: Path,
        env: dict[str, str] | None = None,
        mode: str = "colocated",
        remote_prefill_min_tokens: int = REMOTE_PREFILL_MIN_TOKENS,
    ) -> None:
        self.mode = mode
        self.stdout, self.stderr = logs / f"{mode}.out", logs / f"{mode}.err"
        if mode == "colocated":
            command = ["-m", "services.gateway.server", "--colocated", "--model", MODEL, "--port", "0"]
        else:
            placement, _, transport = mode.partition("-")
            command = ["-m", "services.cli", "up", "--port", "0", "--model", MODEL, "--placement", placement]
            command += [
                "--transport",
                transport or "grpc",
                "--attention",
                "2",
                "--prefill",
                "1",
                "--decode",
                "1",
                "--kv-budget-gb",
                "0.5",
                "--remote-prefill-min-tokens",
                str(remote_prefill_min_tokens),
            ]
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, *command],
                cwd=ROOT,
                stdout=out,
                stderr=err,
                env={**os.environ, "DISAGG_CACHE_DIR": str(cache), **(env or {})},
            )
        self.url = self._wait_ready(timeout=240)
        self.children = child_pids(self.process.pid)  # the pods, when this is a cluster

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.stdout.read_text().splitlines()
            if lines and lines[0].startswith("ready: "):
                return lines[0].removeprefix("ready: ")
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the server exited with {self.process.returncode}:\n{self.stderr.read_text()[-5000:]}"
                )
            time.sleep(0.1)
        raise AssertionError(
            f"the server did not print its ready line in {timeout} s:\n{self.stderr.read_text()[-5000:]}"
        )

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.url}/health", timeout=10).json()
        return body

    def wait_idle(self, timeout: float = 15.0) -> None:
        """No request in flight, and (cluster) no KV block held on any attention pod."""
        deadline = time.monotonic() + timeout
        while (health := self.health())["running"] or health["waiting"] or health["in_flight"]:
            assert time.monotonic() < deadline, f"requests still in the engine: {health}"
            time.sleep(0.05)
        while self.mode != "colocated" and (used := self.kv_blocks_used()):
            assert time.monotonic() < deadline, f"attention pods still hold {used} KV blocks"
            time.sleep(0.05)

    def redis_url(self) -> str:
        """The cluster's Redis, as the launcher passed it to its pods."""
        for pid in self.children:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:  # a pod a test killed
                continue
            if "--redis-url" in argv:
                return argv[argv.index("--redis-url") + 1]
        raise AssertionError("no pod was started with --redis-url")

    def attention_pods(self) -> list[str]:
        return [p.info.address for p in self.live_pods(Role.ATTENTION)]

    def live_pods(self, role: Role) -> list[Any]:
        settings = RedisSettings(url=self.redis_url())
        return PodRegistry(connect(settings), settings).live_pods(role)

    def prompts_prefilled(self) -> float:
        """Prompts the cluster's prefill pods prefilled successfully, from their /metrics."""
        total = 0.0
        for pod in self.live_pods(Role.PREFILL):
            text = httpx.get(f"http://{pod.info.metrics_address}/metrics", timeout=10).text
            total += sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("disagg_prefill_requests_total{") and 'status="ok"' in line
            )
        return total

    def kv_blocks_used(self) -> int:
        """KV blocks held on every live attention pod, from their Stats RPC."""
        used = 0
        for address in self.attention_pods():
            with grpc.insecure_channel(address) as channel:
                stats = attention_pb2_grpc.AttentionStub(channel).Stats(
                    attention_pb2.StatsRequest(), timeout=5
                )
                used += stats.blocks_used
        return used

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module", params=["colocated", "head", "request-nixl"])
def gateway(
    request: pytest.FixtureRequest, model_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    server = Gateway(model_folder.parent, tmp_path_factory.mktemp("gateway"), mode=request.param)
    try:
        yield server
    finally:
        started = time.monotonic()
        assert server.stop() == 0, server.stderr.read_text()[-3000:]
        if server.mode != "colocated":  # Ctrl-C / SIGTERM stops every child within 10 s
            assert time.monotonic() - started < 10
            assert server.children and not [pid for pid in server.children if alive(pid)]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def cases(model_folder: Path, hf_reference_model: Any) -> list[Case]:
    tokenizer = Tokenizer.from_folder(model_folder)
    cases = []
    for prompt, chat in [(p, False) for p in RAW_PROMPTS] + [(p, True) for p in CHAT_PROMPTS]:
        ids = (
            tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
        )
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf_reference_model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False
            )
        reference = out[0, len(ids) :].tolist()
        cases.append(Case(prompt, chat, ids, reference, tokenizer.decode(reference)))
    return cases


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def generate(client: openai.OpenAI, case: Case, stream: bool) -> tuple[str, Any]:
    """(text, usage or None) for one case, through the endpoint that fits it."""
    common: dict[str, Any] = {"model": MODEL, "max_tokens": NEW_TOKENS, "temperature": 0}
    if case.chat:
        messages: Any = [{"role": "user", "content": case.prompt}]
        if not stream:
            chat = client.chat.completions.create(messages=messages, **common)
            return chat.choices[0].message.content or "", chat.usage
        chunks = client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **common
        )
        parts, usage = [], None
        for chunk in chunks:
            parts += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        return "".join(parts), usage
    if not stream:
        completion = client.completions.create(prompt=case.prompt, **common)
        return completion.choices[0].text, completion.usage
    pieces = client.completions.create(prompt=case.prompt, stream=True, **common)
    return "".join(c.text for p in pieces for c in p.choices), None


# ---- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_greedy_outputs_equal_transformers(client: openai.OpenAI, cases: list[Case], stream: bool) -> None:
    for case in cases:
        text, usage = generate(client, case, stream)
        assert text == case.text, case.prompt
        if usage is not None:
            assert usage.prompt_tokens == len(case.prompt_ids)
            assert usage.completion_tokens == len(case.reference_ids)  # the EOS counts
            assert usage.total_tokens == len(case.prompt_ids) + len(case.reference_ids)


def test_short_prompts_are_prefilled_by_the_decode_pod(
    client: openai.OpenAI, gateway: Gateway, cases: list[Case]
) -> None:
    """Conditional disaggregation: a prompt under --remote-prefill-min-tokens never reaches the
    prefill pod, a longer one does (both are exact: test_greedy_outputs_equal_transformers)."""
    if gateway.mode == "colocated":
        pytest.skip("no prefill pod")
    short = [c for c in cases if len(c.prompt_ids) < REMOTE_PREFILL_MIN_TOKENS]
    long = [c for c in cases if len(c.prompt_ids) >= REMOTE_PREFILL_MIN_TOKENS]
    assert short and long  # else the case list no longer tells the paths apart
    before = gateway.prompts_prefilled()
    for case in short:
        assert generate(client, case, stream=False)[0] == case.text
    assert gateway.prompts_prefilled() == before
    for case in long:
        assert generate(client, case, stream=False)[0] == case.text
    assert gateway.prompts_prefilled() == before + len(long)


def test_sixteen_concurrent_requests(client: openai.OpenAI, gateway: Gateway, cases: list[Case]) -> None:
    jobs = [(case, stream) for case in cases for stream in (False, True)]
    assert len(jobs) == 16
    started = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: generate(client, *job)[0], jobs))
    elapsed = time.monotonic() - started
    assert results == [case.text for case, _ in jobs]
    print(f"16 concurrent requests of {NEW_TOKENS} tokens: {elapsed:.1f} s")
    gateway.wait_idle()


@pytest.fixture(scope="module")
def sink_window_reference(model: Any) -> tuple[list[int], str, str]:
    """(prompt ids, dense text, sink_window text) from the engine in this process."""
    from services.core.attention import PolicyName, PolicySpec
    from services.decode.colocated import build_engine
    from services.decode.sampling import SamplingParams

    ids = model.tokenizer.encode(LONG_TEXT)
    texts = []
    for policy in (None, PolicySpec(PolicyName.SINK_WINDOW, 0.05)):
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, attention_policy=policy)
        texts.append(build_engine(model).generate([ids], params)[0].text)
    return ids, texts[0], texts[1]


def test_an_attention_policy_travels_with_the_request(
    client: openai.OpenAI, sink_window_reference: tuple[list[int], str, str]
) -> None:
    """The API field reaches the attention part on every path (colocated, through decode pods to
    attention pods): sink_window, whose reads depend on positions only, gives the in-process
    engine's text, which differs from dense's for this prompt."""
    ids, dense_text, sink_text = sink_window_reference
    assert sink_text != dense_text  # else this prompt could not tell the policy was applied
    policy = {"attention_policy": {"name": "sink_window", "budget": 0.05}}
    completion = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=NEW_TOKENS, temperature=0, extra_body=policy
    )
    assert completion.choices[0].text == sink_text


def test_models_and_health(client: openai.OpenAI, gateway: Gateway) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert gateway.health()["status"] == "ok"


# ---- bad input -----------------------------------------------------------------------------------


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def test_bad_inputs_get_clean_errors_and_the_server_keeps_serving(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    url = gateway.url
    headers = {"content-type": "application/json"}
    malformed = httpx.post(
        f"{url}/v1/chat/completions", content=b'{"model": "smollm2-135m", "messages": [', headers=headers
    )
    assert assert_openai_error(malformed, 400)["type"] == "invalid_request_error"
    not_a_list = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": "hello"})
    assert assert_openai_error(not_a_list, 400)["param"] == "messages"

    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as negative:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert negative.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"

    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert (
        ok.choices[0].finish_reason == "length" and ok.usage is not None and ok.usage.completion_tokens == 3
    )
    gateway.wait_idle()


# ---- cancellation ----------------------------------------------------------------------------------


def test_streaming_client_that_disconnects_frees_its_request(gateway: Gateway) -> None:
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data: ")]
        assert len(received) >= 3
        assert gateway.health()["running"] == 1
    gateway.wait_idle(timeout=10)


def test_plain_client_that_times_out_frees_its_request(gateway: Gateway) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=1.5)
    gateway.wait_idle(timeout=10)


# ---- shutdown ----------------------------------------------------------------------------------


def test_sigterm_finishes_short_requests_and_fails_long_ones_clearly(
    model_folder: Path, tmp_path: Path
) -> None:
    server = Gateway(model_folder.parent, tmp_path, env={"DISAGG_GATEWAY_SHUTDOWN_GRACE_SECONDS": "2"})
    try:
        short = {"model": MODEL, "prompt": "Hello", "max_tokens": 12, "temperature": 0}
        long = {**short, "max_tokens": 3000, "stream": True}
        with ThreadPoolExecutor(2) as pool:
            long_reply = pool.submit(httpx.post, f"{server.url}/v1/completions", json=long, timeout=60)
            wait_for(lambda: server.health()["running"] == 1)
            short_reply = pool.submit(httpx.post, f"{server.url}/v1/completions", json=short, timeout=60)
            wait_for(lambda: server.health()["running"] == 2)
            server.process.send_signal(signal.SIGTERM)
            assert short_reply.result().status_code == 200  # finished within the 2 s grace period
            streamed = long_reply.result()
        assert streamed.status_code == 200 and "[DONE]" not in streamed.text
        assert '"code":"shutting_down"' in streamed.text.strip().splitlines()[-1]
        assert server.process.wait(20) == 0
    finally:
        server.stop()
