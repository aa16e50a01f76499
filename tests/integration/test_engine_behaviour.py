"""Engine behaviour on the real model: stops, lengths, cancellation, streaming text."""

from __future__ import annotations

import pytest

from services.core.errors import PromptTooLongError
from services.core.model.load import LoadedModel
from services.decode.colocated import build_engine
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
