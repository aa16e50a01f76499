"""Tokenizer, chat template and streaming detokenization for one model folder.

A model folder holds `tokenizer.json` (run by the `tokenizers` library) and `tokenizer_config.json`
(special tokens, and the chat template unless `chat_template.jinja` holds it). `Tokenizer` encodes and
decodes exactly as `transformers.AutoTokenizer` does for the same folder, and renders the chat template
the way `apply_chat_template(..., tokenize=False)` does. transformers itself is not imported: it takes
seconds and is a dev-only dependency.

Streaming (`TextStream`, one per request) turns generated token ids into text deltas in two layers:

1. Incremental detokenization (vLLM's prefix/read-offset algorithm). Decoding one token at a time is
   wrong: a character may be split over several tokens (byte-level BPE, `<0xE4>` byte-fallback
   tokens), and SentencePiece-style decoders drop a leading space at the start of a decode. So the
   stream keeps a window of ids `[prefix | new]`: `prefix` is a few ids already turned into text
   (at the start, the prompt's last ids, so the first token's leading space comes out right) and
   `new` the ids not yet emitted. Each push decodes the window; the text past `decode(prefix)` is
   emitted unless it ends with U+FFFD (an incomplete character: wait for the next token). After an
   emit, the window slides: `prefix` becomes the ids just emitted. `flush()` emits whatever is left
   (say, a model that ended on a lone byte), so deltas + flush == `decode(generated_ids)`.
   (`tokenizers.decoders.DecodeStream` runs the same algorithm but has no flush.)

2. Stop strings (OpenAI semantics). The stream stops at the first character position where the text
   contains a stop string; the stop string and everything after it are never returned. Text whose
   tail could still grow into a stop string (a suffix that is a prefix of one) is held back and
   released once it can no longer match, or on flush. Because only such a suffix is held back, a stop
   string can never straddle text already emitted, so only the pending text is searched.

Known limits: with byte-fallback tokenizers, a run of byte tokens that is invalid UTF-8 turns into
one U+FFFD per byte *for the whole run* in `decode`, so a valid character streamed before an invalid
byte of the same run can differ from the batch decode (garbage output either way). With prompt
context, SentencePiece models stream the first token's leading space, where `decode(generated_ids)`
alone strips it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from services.core.errors import InvalidRequestError, ModelLoadError
from services.core.model.chat_template import check_messages, compile_template

# Named special tokens that transformers hands to chat templates as variables (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Prompt ids kept as decoding context for the first generated token (vLLM uses 5 too).
PROMPT_CONTEXT_IDS = 5
PROMPT_CONTEXT_MAX_IDS = 32  # ... or up to this many, so that the context's text ends on a whole character
REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for bytes that are not (yet) valid UTF-8


class Tokenizer:
    """Encode, decode and chat-template rendering for one model; build it with `from_folder`."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str],
        chat_template: jinja2.Template | None,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.backend = backend  # the `tokenizers` object; TextStream decodes with it
        self.special_tokens = special_tokens  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}
        self._chat_template = chat_template
        self.eos_token_ids = eos_token_ids  # generation ends on any of these

    @classmethod
    def from_folder(cls, folder: Path, *, extra_eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`) from `folder`.

        `extra_eos_token_ids` adds stop ids beyond the config's `eos_token` (e.g. from
        `generation_config.json`).
        """
        folder = Path(folder)
        config = (
            _read_json(folder / "tokenizer_config.json")
            if (folder / "tokenizer_config.json").is_file()
            else {}
        )
        try:
            backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises plain Exception for missing or malformed files
            raise ModelLoadError(
                f"cannot read {folder / 'tokenizer.json'}: {exc}. The model folder needs a Hugging Face "
                "tokenizer.json (convert GGUF models first)."
            ) from exc
        special_tokens = {
            name: content
            for name in SPECIAL_TOKEN_NAMES
            if (content := _token_content(config.get(name))) is not None
        }
        _add_missing_tokens(backend, config, special_tokens)
        eos_ids = [backend.token_to_id(special_tokens["eos_token"])] if "eos_token" in special_tokens else []
        eos_ids += list(extra_eos_token_ids)
        template_source = _read_chat_template(folder, config)
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=None if template_source is None else compile_template(template_source, folder),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (`len(AutoTokenizer)`)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry for `token_id` (e.g. "Ġworld"), None if out of range."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as `AutoTokenizer(...)(text).input_ids`."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as `AutoTokenizer.decode` (which has no space clean-up for BPE models)."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages`, as `apply_chat_template(messages, tokenize=False, ...)`."""
        if self._chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template, so it cannot take `messages`; send a raw prompt to "
                "/v1/completions instead"
            )
        chat = check_messages(messages)
        try:
            return self._chat_template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:  # includes the template's own raise_exception(...)
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}", "messages"
            ) from exc

    def encode_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for `messages`; like transformers, no BOS is added on top of the template's own."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


@dataclass(slots=True, frozen=True)
class TextDelta:
    text: str  # text to send now; may be empty (held back: incomplete character or possible stop string)
    stopped: bool  # a stop string was found; `text` ends right before it and the request is done


class TextStream:
    """Generated ids in, text deltas out, with stop strings; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
            raise InvalidRequestError("`stop` must be a list of non-empty strings", "stop")
        self._detokenizer = _IncrementalDetokenizer(tokenizer.backend, prompt_ids, skip_special_tokens)
        self._stop = tuple(stop)
        self._pending = ""  # decoded but not emitted: could be the start of a stop string
        self._emitted: list[str] = []
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended the stream, if any

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    def push(self, token_id: int) -> TextDelta:
        """Add one generated token. After a stop, further tokens are ignored."""
        if self.stopped:
            return TextDelta("", True)
        self._pending += self._detokenizer.push(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: the text still held back (nothing if a stop string was found)."""
        if self.stopped:
            return ""
        self._pending += self._detokenizer.flush()
        return self._release(final=True).text

    def _release(self, *, final: bool) -> TextDelta:
        found = _first_stop(self._pending, self._stop)
        if found is not None:
            start, self.stop_string = found
            out, self._pending, self.stopped = self._pending[:start], "", True
        else:
            keep = 0 if final else _stop_prefix_length(self._pending, self._stop)
            cut = len(self._pending) - keep
            out, self._pending = self._pending[:cut], self._pending[cut:]
        self._emitted.append(out)
        return TextDelta(out, self.stopped)


class _IncrementalDetokenizer:
    """The window `ids = [prefix | new]` of the module docstring; `prefix_text = decode(prefix)`."""

    __slots__ = ("_backend", "_ids", "_prefix_len", "_prefix_text", "_skip_special_tokens")

    def __init__(
        self, backend: BackendTokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool
    ) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._ids = self._prompt_context(prompt_ids)
        self._prefix_text = self._decode(self._ids)
        self._prefix_len = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or an incomplete character: wait for more tokens
        delta = text[len(self._prefix_text) :]
        del self._ids[: self._prefix_len]  # the ids just emitted become the next prefix
        self._prefix_len = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta

    def flush(self) -> str:
        delta = self._decode(self._ids)[len(self._prefix_text) :]
        del self._ids[: self._prefix_len]
        self._prefix_len = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt's last ids, with text that ends on a whole character.

        Cutting a fixed number of ids can split a run of byte tokens (a byte-fallback decoder then
        turns the whole run into U+FFFD), so widen the cut; a prompt that really ends inside a
        character (raw token prompts) loses those ids instead.
        """
        candidates = list(prompt_ids[-PROMPT_CONTEXT_MAX_IDS:])
        start = max(0, len(candidates) - PROMPT_CONTEXT_IDS)
        while start > 0 and self._incomplete(candidates[start:]):
            start -= 1
        ids = candidates[start:]
        while ids and self._incomplete(ids):
            ids.pop()
        return ids

    def _incomplete(self, ids: list[int]) -> bool:
        return self._decode(ids).endswith(REPLACEMENT_CHAR)

    def _decode(self, ids: list[int]) -> str:
        return str(self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens))


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop string) of the stop occurrence that ends first (ties: the longer one), or None.

    Ending first is what a character-by-character stream would see first, so the result does not depend
    on how the text was split into tokens.
    """
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    return None if best is None else (best[1], best[2])


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


# --- loading ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _add_missing_tokens(
    backend: BackendTokenizer, config: dict[str, Any], special_tokens: dict[str, str]
) -> None:
    """Add what transformers adds on load: `added_tokens_decoder` entries and named special tokens
    that tokenizer.json lacks (a complete tokenizer.json already has them all)."""
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    to_add = [
        AddedToken(entry["content"], **{flag: bool(entry[flag]) for flag in flags if flag in entry})
        for entry in (config.get("added_tokens_decoder") or {}).values()
        if isinstance(entry, dict)
        and isinstance(entry.get("content"), str)
        and backend.token_to_id(entry["content"]) is None
    ]
    for content in special_tokens.values():
        if backend.token_to_id(content) is None and all(t.content != content for t in to_add):
            to_add.append(AddedToken(content, special=True, normalized=False))
    if to_add:
        backend.add_tokens(to_add)


def _read_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template, found where transformers looks: chat_template.jinja first, then the
    config's `chat_template` (a string, or a list of {"name", "template"} with a "default" entry)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
