"""Engine behaviour on the real model: stops, lengths, cancellation, streaming text, prefilled
admission, and the engine loop's remote-prefill stage and attention pod failure isolation."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf

import pytest
import torch

from services.attention.local import LocalAttention
from services.core.attention import AttentionPart, AttentionStep, PolicySpec, ReserveResult, SeqChunk
from services.core.errors import DisaggError, PromptTooLongError
from services.core.model.load import LoadedModel
from services.decode.attention_link import AttentionPodError
from services.decode.colocated import build_engine
from services.decode.engine import Engine
from services.decode.loop import EngineLoop, PrefillJob, PrefillUnavailableError
from services.decode.sampling import SamplingParams
from services.decode.scheduler import FinishReason, SchedulerConfig

pytestmark = pytest.mark.slow


def chat(model: LoadedModel, text: str) -> list[int]:
    return model.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_eos_ends_with_stop_and_is_included_in_token_ids(model: LoadedModel) -> None:
    engine = build_engine(model)
    result = engine.generate([chat(model, "What is the capital of France?")], SamplingParams(temperature=0))[
        0
    ]
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason is FinishReason.STOP
    assert result.token_ids[-1] in model.tokenizer.eos_token_ids


def test_max_tokens_ends_with_length(model: LoadedModel) -> None:
    engine = build_engine(model)
    result = engine.generate([model.tokenizer.encode("Once upon a time")], SamplingParams(max_tokens=5))[0]
    assert len(result.token_ids) == 5 and result.finish_reason is FinishReason.LENGTH


def test_stop_string_cuts_text_before_it(model: LoadedModel) -> None:
    engine = build_engine(model)
    prompt = chat(model, "What is the capital of France?")
    result = engine.generate([prompt], SamplingParams(temperature=0, stop=("France",)))[0]
    assert result.text == "The capital of "
    assert result.finish_reason is FinishReason.STOP


def test_stop_token_ids_end_generation(model: LoadedModel) -> None:
    engine = build_engine(model)
    prompt = chat(model, "What is the capital of France?")
    full = engine.generate([prompt], SamplingParams(temperature=0))[0].token_ids
    result = engine.generate([prompt], SamplingParams(temperature=0, stop_token_ids=(full[2],)))[0]
    assert result.token_ids == full[:3] and result.finish_reason is FinishReason.STOP


def test_streamed_text_equals_decoded_tokens(model: LoadedModel) -> None:
    engine = build_engine(model)
    prompt = chat(model, "Write a short poem with an emoji in every line.")
    result = engine.generate([prompt], SamplingParams(max_tokens=60, temperature=0.8, seed=3))[0]
    assert result.text == model.tokenizer.decode(result.token_ids)


def test_the_context_window_ends_generation(model: LoadedModel) -> None:
    engine = build_engine(model, scheduler=SchedulerConfig(max_model_len=40))
    prompt = model.tokenizer.encode("Count: one, two, three,")
    result = engine.generate([prompt], SamplingParams(max_tokens=1000, ignore_eos=True))[0]
    assert len(prompt) + len(result.token_ids) == 40 and result.finish_reason is FinishReason.LENGTH
    with pytest.raises(PromptTooLongError):
        engine.add_request(list(range(40)), SamplingParams())


def test_abort_frees_kv_immediately_and_others_continue(model: LoadedModel) -> None:
    engine = build_engine(model)
    pool = engine.attention.pool  # type: ignore[attr-defined]
    keep = engine.add_request(
        chat(model, "Name three colours."), SamplingParams(temperature=0, max_tokens=20)
    )
    drop = engine.add_request(model.tokenizer.encode("A long story: " * 40), SamplingParams(max_tokens=200))
    engine.step()
    engine.step()
    used_before = pool.allocator.num_used_blocks
    event = engine.abort(drop)
    assert event is not None and event.finish_reason is FinishReason.ABORT
    assert pool.allocator.num_used_blocks < used_before
    assert engine.abort(drop) is None
    reasons = [e.finish_reason for _ in range(40) for e in engine.step() if e.seq_id == keep]
    assert reasons[-1] in (FinishReason.STOP, FinishReason.LENGTH)
    assert pool.allocator.num_used_blocks == 0


# ---- prefilled admission: the prompt's KV written from outside the engine ---------------------
def prefill_here(engine: Engine, seq_id: int, prompt: list[int]) -> None:
    """What a prefill pod does: the forward over prompt[:-1] writes its K/V into the open sequence."""
    n = len(prompt) - 1
    step = engine.attention.begin([SeqChunk(seq_id, 0, n)])
    engine.model.forward(torch.tensor(prompt[:n]), torch.arange(n), step)


def test_a_prefilled_request_generates_the_tokens_of_a_local_prefill(model: LoadedModel) -> None:
    engine = build_engine(model)
    prompts = [chat(model, "What is the capital of France?"), chat(model, "List three prime numbers.")]
    params = SamplingParams(temperature=0, max_tokens=20)
    expected = [c.token_ids for c in engine.generate(prompts, params)]
    for seq_id, prompt in enumerate(prompts, start=100):
        assert engine.open_for_prefill(seq_id, len(prompt))
        prefill_here(engine, seq_id, prompt)
        engine.add_request(prompt, params, seq_id=seq_id, prefilled=len(prompt) - 1)
    forwards: list[list[SeqChunk]] = []
    begin = engine.attention.begin

    def recording_begin(chunks: SequenceOf[SeqChunk]) -> AttentionStep:
        forwards.append(list(chunks))
        return begin(chunks)

    engine.attention.begin = recording_begin  # type: ignore[method-assign]
    tokens: dict[int, list[int | None]] = {100: [], 101: []}
    while engine.has_work():
        for event in engine.step():
            tokens[event.seq_id].append(event.token_id)
    assert [tokens[100], tokens[101]] == expected
    assert forwards[0] == [SeqChunk(i, len(p) - 1, 1) for i, p in enumerate(prompts, start=100)]
    assert engine.attention.pool.allocator.num_used_blocks == 0  # type: ignore[attr-defined]


def test_open_for_prefill_keeps_nothing_when_the_kv_is_full(model: LoadedModel) -> None:
    engine = build_engine(model, kv_budget_bytes=8 << 20)  # a few hundred positions
    pool = engine.attention.pool  # type: ignore[attr-defined]
    assert not engine.open_for_prefill(0, 100_000)
    assert pool.allocator.num_used_blocks == 0
    assert engine.open_for_prefill(1, 20)
    engine.free_prefill(1)
    assert pool.allocator.num_used_blocks == 0


# ---- the engine loop: prefill jobs and attention pod failures ---------------------------------
class LocalPrefillJob(PrefillJob):
    """A stand-in for a prefill pod: fills the KV when started (on the engine thread), then
    reports `error`; with `hold`, it reports only when the test calls `finish`."""

    def __init__(self, engine: Engine, prompt: list[int], error: Exception | None = None, hold: bool = False):
        self.engine, self.prompt, self.error, self.hold = engine, prompt, error, hold
        self.num_tokens = len(prompt) - 1
        self._done: Callable[[Exception | None], None] | None = None

    def start(self, seq_id: int, done: Callable[[Exception | None], None]) -> None:
        if self.error is None:
            prefill_here(self.engine, seq_id, self.prompt)
        self._done = done
        if not self.hold:
            self.finish()

    def finish(self) -> None:
        assert self._done is not None
        self._done(self.error)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_loop_admits_prefilled_requests_and_frees_failed_or_cancelled_prefills(model: LoadedModel) -> None:
    engine = build_engine(model)
    pool = engine.attention.pool  # type: ignore[attr-defined]
    prompt = chat(model, "What is the capital of France?")
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = engine.generate([prompt], params)[0].token_ids
    loop = EngineLoop(engine)
    loop.start()
    try:
        held = LocalPrefillJob(engine, prompt, hold=True)
        cancelled = loop.submit(prompt, params, prefill=held)
        failed = loop.submit(
            prompt, params, prefill=LocalPrefillJob(engine, prompt, DisaggError("prefill pod x: boom"))
        )
        good = loop.submit(prompt, params, prefill=LocalPrefillJob(engine, prompt))
        unavailable = LocalPrefillJob(engine, prompt, PrefillUnavailableError("prefill pod y: gone"))
        fallback = loop.submit(prompt, params, prefill=unavailable)
        assert [e.token_id for e in good] == expected
        assert [e.token_id for e in fallback] == expected  # prefilled here instead, not failed
        with pytest.raises(DisaggError, match="prefill pod x: boom"):
            list(failed)
        wait_for(lambda: held._done is not None)
        assert loop.num_waiting == 1 and pool.allocator.num_used_blocks > 0  # prefilling holds its KV
        cancelled.cancel()
        assert [e.finish_reason for e in cancelled] == [FinishReason.ABORT]  # at once, prefill or not
        assert pool.allocator.num_used_blocks > 0  # freed only when the prefill reports back
        held.finish()
        wait_for(lambda: pool.allocator.num_used_blocks == 0 and loop.num_waiting == 0)
    finally:
        loop.stop()


class PodsOfLocalAttention(AttentionPart):
    """Local attention whose sequences pretend to live on pods (`pods`: seq id -> address). The
    `fail_on`-th forward that holds sequences of every pod fails at `layer` with AttentionPodError
    for `failing` — after the layers before it wrote their K/V, as a pod dying mid-step would."""

    def __init__(self, local: LocalAttention, pods: dict[int, str], failing: str, fail_on: int, layer: int):
        self.local, self.pods, self.failing, self.layer = local, pods, failing, layer
        self.forwards_left = fail_on

    def placed_on(self, seq_id: int, address: str) -> bool:
        return self.pods.get(seq_id) == address

    def open(self, seq_id: int, policy: PolicySpec | None = None) -> None:
        self.local.open(seq_id, policy)

    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult:
        return self.local.reserve(seq_id, num_tokens)

    def free(self, seq_id: int) -> None:
        self.local.free(seq_id)

    def max_tokens_per_sequence(self) -> int:
        return self.local.max_tokens_per_sequence()

    def begin(self, chunks: SequenceOf[SeqChunk]) -> AttentionStep:
        step = self.local.begin(chunks)
        if {self.pods[c.seq_id] for c in chunks} == set(self.pods.values()):
            self.forwards_left -= 1
            if self.forwards_left == 0:
                return FailingStep(step, self.failing, self.layer)
        return step


class FailingStep(AttentionStep):
    def __init__(self, step: AttentionStep, address: str, layer: int) -> None:
        self.step, self.address, self.layer = step, address, layer

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        if layer == self.layer:
            raise AttentionPodError(self.address, "Step stream failed: UNAVAILABLE: connection reset")
        return self.step.attend(layer, q, k_new, v_new)


def test_an_attention_pod_failure_ends_only_its_requests(model: LoadedModel) -> None:
    """Requests 0 and 2 on pod-a, 1 on pod-b; pod-b fails mid-forward: 1 gets the error naming
    pod-b, 0 and 2 run the step again and generate exactly what they would have."""
    colocated = build_engine(model)
    prompts = [chat(model, text) for text in ("Name three colours.", "Write a haiku about the sea.", "Hi!")]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [c.token_ids for c in colocated.generate(prompts, params)]
    flaky = PodsOfLocalAttention(
        colocated.attention,  # type: ignore[arg-type]
        pods={0: "pod-a", 1: "pod-b", 2: "pod-a"},
        failing="pod-b",
        fail_on=3,
        layer=model.config.num_layers // 2,
    )
    loop = EngineLoop(Engine(model.dense, flaky, model.tokenizer, colocated.config))
    loop.start()
    try:
        streams = [loop.submit(p, params) for p in prompts]
        assert [e.token_id for e in streams[0]] == expected[0]
        assert [e.token_id for e in streams[2]] == expected[2]
        with pytest.raises(AttentionPodError, match="attention pod pod-b: Step stream failed") as info:
            list(streams[1])
        assert info.value.address == "pod-b"
        assert flaky.forwards_left == 0  # the failure happened, in a forward holding both pods
        assert loop.is_running
        wait_for(lambda: not loop.engine.has_work())
        assert colocated.attention.pool.allocator.num_used_blocks == 0  # type: ignore[attr-defined]
    finally:
        loop.stop()
