"""The gateway's HTTP API on the real model: response shapes, streaming, validation and error JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.core.model.load import LoadedModel
from services.gateway.app import create_app
from services.gateway.backend import ColocatedBackend
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def backend(model: LoadedModel) -> Iterator[ColocatedBackend]:
    backend = ColocatedBackend(model, model_name=MODEL, cost_usd_per_hour=3.6)  # priced: usage has a cost
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def client(backend: ColocatedBackend) -> Iterator[TestClient]:
    with TestClient(create_app(backend, GatewaySettings())) as client:
        yield client
    load = backend.load()
    assert (load.running, load.waiting) == (0, 0)


def completion(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/completions", json={"model": MODEL, **body})


def chat(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": MODEL, **body})


def sse_events(response: Any) -> list[Any]:
    """The JSON payloads of an SSE body; [DONE] as the string "[DONE]"."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response: Any, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else error["type"])
    assert error["param"] == param and error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]
    return str(error["message"])


# ---- shapes --------------------------------------------------------------------------------------


def test_completion_shape_and_usage(client: TestClient, model: LoadedModel) -> None:
    response = completion(client, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL
    assert body["choices"] == [
        {"index": 0, "text": body["choices"][0]["text"], "logprobs": None, "finish_reason": "length"}
    ]
    prompt_tokens = len(model.tokenizer.encode("The capital of France is"))
    usage = body["usage"]
    cost, breakdown = usage.pop("cost_usd"), usage.pop("cost_breakdown")
    assert usage == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    }
    # colocated: one process, its price accrued by the engine's steps (docs/cost.md)
    assert cost > 0 and cost == pytest.approx(sum(breakdown.values()))
    assert breakdown["decode"] == cost and breakdown["prefill"] == breakdown["attention"] == 0


def test_chat_shape_counts_the_eos_token(client: TestClient, model: LoadedModel) -> None:
    body = chat(client, messages=FRANCE, temperature=0).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "The capital of France is Paris.",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    text_tokens = len(model.tokenizer.encode("The capital of France is Paris.", add_special_tokens=False))
    assert body["usage"]["completion_tokens"] == text_tokens + 1  # + <|im_end|>
    assert body["usage"]["prompt_tokens"] == len(model.tokenizer.encode_chat(FRANCE))


def test_chat_stream_starts_with_the_role_and_ends_with_done(client: TestClient) -> None:
    events = sse_events(chat(client, messages=FRANCE, temperature=0, stream=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "The capital of France is Paris."


def test_stream_with_usage_ends_with_a_usage_chunk(client: TestClient) -> None:
    events = sse_events(
        completion(client, prompt="Hello", max_tokens=4, stream=True, stream_options={"include_usage": True})
    )
    *chunks, usage_chunk, done = events
    assert done == "[DONE]"
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["cost_usd"] > 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streamed_and_plain_completions_agree(client: TestClient) -> None:
    request = {"prompt": "def fibonacci(n):", "max_tokens": 20, "temperature": 0}
    plain = completion(client, **request).json()["choices"][0]["text"]
    events = sse_events(completion(client, **request, stream=True))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain


def test_prompt_forms_are_equivalent(client: TestClient, model: LoadedModel) -> None:
    ids = model.tokenizer.encode("Paris is the capital of")
    texts = [
        completion(client, prompt=prompt, max_tokens=6, temperature=0).json()["choices"][0]["text"]
        for prompt in ("Paris is the capital of", ["Paris is the capital of"], ids, [ids])
    ]
    assert len(set(texts)) == 1 and texts[0]


def test_stop_strings_and_content_parts(client: TestClient) -> None:
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the capital of "},
                {"type": "text", "text": "France?"},
            ],
        }
    ]
    body = chat(client, messages=parts, temperature=0, stop="France").json()
    assert body["choices"][0]["message"]["content"] == "The capital of "
    assert body["choices"][0]["finish_reason"] == "stop"
    body = chat(client, messages=FRANCE, temperature=0, stop=["Paris", "xyz"]).json()
    assert body["choices"][0]["message"]["content"] == "The capital of France is "


def test_seeded_sampling_repeats_and_unknown_fields_are_ignored(client: TestClient) -> None:
    request = {"prompt": "Once upon a time", "max_tokens": 12, "seed": 1234, "top_p": 0.9, "top_k": 50}
    first = completion(client, **request, user="u1", some_future_field={"x": 1}).json()
    second = completion(client, **request).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_ignore_eos_generates_max_tokens(client: TestClient) -> None:
    """vLLM's extension, which benchmark tools send: the chat turn ends with EOS, yet 40 tokens come."""
    natural = chat(client, messages=FRANCE, temperature=0, max_tokens=40).json()
    assert natural["choices"][0]["finish_reason"] == "stop" and natural["usage"]["completion_tokens"] < 40
    forced = chat(client, messages=FRANCE, temperature=0, max_tokens=40, ignore_eos=True).json()
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 40


def test_models_health_and_docs(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [(MODEL, "model", "disagg")]
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "running": 0, "waiting": 0, "in_flight": 0}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -3}, "top_k"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "logprobs": 1}, "logprobs"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "attention_policy": {"name": "magic"}}, "attention_policy"),
        ({"prompt": "x", "attention_policy": {"name": "sparq", "budget": 0}}, "attention_policy"),
        ({"prompt": "x", "attention_policy": {"name": "sparq", "budget": -1}}, "attention_policy"),
        ({"prompt": "x", "attention_policy": {"name": "sparq", "budget": "lots"}}, "attention_policy"),
        ({"prompt": "x", "attention_policy": {"name": "sparq", "bugdet": 0.1}}, "attention_policy"),
        ({"prompt": "x", "attention_policy": {"budget": 0.1}}, "attention_policy"),
        ({"prompt": "x", "attention_policy": "sparq"}, "attention_policy"),
        ({"prompt": "x", "attention_policy": {"name": "heavy_hitter", "scoring": "lru"}}, "attention_policy"),
    ],
)
def test_invalid_completion_requests_are_400(client: TestClient, body: dict[str, Any], param: str) -> None:
    assert_error(completion(client, **body), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "What is the capital of France?"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({}, "messages"),
        ({"messages": FRANCE, "max_completion_tokens": -1}, "max_tokens"),
        ({"messages": FRANCE, "logprobs": True}, "logprobs"),
        ({"messages": FRANCE, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": FRANCE, "attention_policy": {"name": "streaming"}}, "attention_policy"),
    ],
)
def test_invalid_chat_requests_are_400(client: TestClient, body: dict[str, Any], param: str) -> None:
    assert_error(chat(client, **body), 400, param)


def test_attention_policy_errors_name_the_choices(client: TestClient) -> None:
    message = assert_error(
        completion(client, prompt="x", attention_policy={"name": "magic"}), 400, "attention_policy"
    )
    assert "magic" in message and all(
        n in message for n in ("dense", "sink_window", "heavy_hitter", "sparq", "quest")
    )
    message = assert_error(
        chat(client, messages=FRANCE, attention_policy={"name": "sparq", "budget": 0}),
        400,
        "attention_policy",
    )
    assert "budget" in message and "> 0" in message


@pytest.mark.parametrize("policy", ["sink_window", "heavy_hitter", "sparq", "quest"])
def test_every_policy_at_full_budget_answers_as_dense(client: TestClient, policy: str) -> None:
    plain = chat(client, messages=FRANCE, max_tokens=12, temperature=0).json()["choices"][0]["message"]
    body = {"messages": FRANCE, "max_tokens": 12, "temperature": 0}
    full = chat(client, **body, attention_policy={"name": policy, "budget": 1.0})
    assert full.status_code == 200 and full.json()["choices"][0]["message"] == plain
    low = completion(
        client, prompt="Once upon a time", max_tokens=4, attention_policy={"name": policy, "budget": 0.1}
    )
    assert low.status_code == 200 and low.json()["usage"]["completion_tokens"] == 4


def test_malformed_json_is_400(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    response = client.post(
        "/v1/completions", content=b'{"model": "smollm2-135m", "prompt": ', headers=headers
    )
    assert "not valid JSON" in assert_error(response, 400)
    response = client.post("/v1/chat/completions", content=b"[1, 2]", headers=headers)
    assert "JSON object" in assert_error(response, 400)
    response = client.post(
        "/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}
    )
    assert "application/json" in assert_error(response, 400)


def test_unknown_model_is_404(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": FRANCE})
    assert "gpt-4o" in assert_error(response, 404, "model", "model_not_found")


def test_prompt_over_the_context_window_is_400(client: TestClient) -> None:
    assert_error(completion(client, prompt=[100] * 8192), 400, "prompt", "context_length_exceeded")
    long_text = "hello " * 9000
    response = chat(client, messages=[{"role": "user", "content": long_text}])
    assert "8192" in assert_error(response, 400, "messages", "context_length_exceeded")


def test_unknown_routes_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/v1/engines"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_still_serving_after_errors(client: TestClient) -> None:
    completion(client, prompt="x", max_tokens=-1)
    client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert completion(client, prompt="Hi", max_tokens=2).status_code == 200


def test_metrics_count_requests_tokens_and_cost(client: TestClient) -> None:
    before = client.get("/metrics").text
    assert completion(client, prompt="Hello", max_tokens=3, temperature=0).status_code == 200
    assert completion(client, prompt="Hello", max_tokens=0).status_code == 400
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text
    labels = 'model="smollm2-135m",pod="'

    def total(text: str, name: str, **match: str) -> float:
        found = 0.0
        for line in text.splitlines():
            if (
                line.startswith(name + "{")
                and labels in line
                and all(f'{k}="{v}"' in line for k, v in match.items())
            ):
                found += float(line.rsplit(" ", 1)[1])
        return found

    assert (
        total(after, "disagg_requests_total", status="ok")
        == total(before, "disagg_requests_total", status="ok") + 1
    )
    assert (
        total(after, "disagg_requests_total", status="invalid")
        == total(before, "disagg_requests_total", status="invalid") + 1
    )
    assert (
        total(after, "disagg_generation_tokens_total") == total(before, "disagg_generation_tokens_total") + 3
    )
    assert 'role="colocated"' in after and total(after, "disagg_decode_batch_size_count") > 0
    # one process, one price: request + idle = 3.6 USD/hour × uptime, split between kinds
    assert total(after, "disagg_pod_cost_usd_per_hour") == 3.6
    request = total(after, "disagg_cost_usd_total", kind="request")
    assert (
        request > total(before, "disagg_cost_usd_total", kind="request")
        and total(after, "disagg_cost_usd_total", kind="idle") > 0
    )
    assert request == pytest.approx(total(after, "disagg_request_cost_usd_total"), rel=1e-6)
