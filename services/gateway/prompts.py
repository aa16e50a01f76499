"""From an API request to what a backend runs: the model id, prompt ids and `SamplingParams`.

Every check that can be made before generation happens here, so a bad request fails with a 400
naming the field before any KV is reserved: unsupported parameters, the prompt's shape, token ids
out of the vocabulary, the context window, and the sampling ranges (`SamplingParams` checks those).
Tokenization runs in a worker thread: a long prompt must not stall the event loop's other streams.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from services.core.attention import PolicySpec
from services.core.errors import InvalidRequestError, PromptTooLongError
from services.core.model.tokenizer import Tokenizer
from services.decode.sampling import SamplingParams
from services.gateway.errors import ModelNotServedError, UnsupportedParameterError
from services.gateway.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


@dataclass(slots=True, frozen=True)
class PreparedRequest:
    model: str  # the served model id, echoed in the response
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool  # streaming: send a last chunk with `usage`


@dataclass(slots=True, frozen=True)
class ModelLimits:
    served: list[str]  # model ids this gateway answers to; the first is the default
    max_model_len: int  # prompt + generated tokens at most
    default_max_tokens: int  # /v1/completions without max_tokens


async def prepare_completion(
    body: CompletionRequest, tokenizer: Tokenizer, limits: ModelLimits
) -> PreparedRequest:
    model = _served_model(body.model, limits)
    _refuse_unsupported(
        body,
        logprobs=body.logprobs is not None,
        echo=bool(body.echo),
        suffix=body.suffix is not None,
        best_of=body.best_of not in (None, 1),
    )
    prompt = _single_prompt(body.prompt)
    if isinstance(prompt, str):
        ids = await asyncio.to_thread(tokenizer.encode, prompt)
    else:
        ids = _checked_token_ids(prompt, tokenizer.vocab_size)
    _check_context(ids, limits.max_model_len, "prompt")
    max_tokens = body.max_tokens if body.max_tokens is not None else limits.default_max_tokens
    return _prepared(body, model, ids, max_tokens)


async def prepare_chat(
    body: ChatCompletionRequest, tokenizer: Tokenizer, limits: ModelLimits
) -> PreparedRequest:
    model = _served_model(body.model, limits)
    _refuse_unsupported(
        body,
        logprobs=bool(body.logprobs) or body.top_logprobs is not None,
        tools=bool(body.tools),
        response_format=body.response_format is not None and body.response_format.get("type") != "text",
    )
    if body.messages is None:
        raise InvalidRequestError("`messages` is required: a list of {role, content} objects", "messages")
    messages = [_plain_message(i, m) for i, m in enumerate(body.messages)]
    ids = await asyncio.to_thread(tokenizer.encode_chat, messages)
    _check_context(ids, limits.max_model_len, "messages")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = requested if requested is not None else limits.max_model_len - len(ids)
    return _prepared(body, model, ids, max_tokens)


def _served_model(requested: str | None, limits: ModelLimits) -> str:
    if requested is None:
        return limits.served[0]
    if requested not in limits.served:
        raise ModelNotServedError(requested, limits.served)
    return requested


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest, **used: bool) -> None:
    """400 for a known parameter we would otherwise silently ignore; `used` maps name -> was it set."""
    used |= {
        "n": body.n not in (None, 1),
        "presence_penalty": bool(body.presence_penalty),
        "frequency_penalty": bool(body.frequency_penalty),
        "logit_bias": bool(body.logit_bias),
    }
    for name, is_set in used.items():
        if is_set:
            hint = " (send n separate requests)" if name == "n" else ""
            raise UnsupportedParameterError(f"`{name}` is not supported by this server{hint}", name)


def _single_prompt(prompt: str | list[int] | list[str] | list[list[int]] | None) -> str | list[int]:
    """One prompt, as text or token ids; a batch of several prompts is refused."""
    if prompt is None:
        raise InvalidRequestError("`prompt` is required: a string or a list of token ids", "prompt")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) != 1:
        raise UnsupportedParameterError(
            f"one prompt per request is supported, got {len(items)}; send them as separate requests",
            "prompt",
        )
    if not items[0]:
        raise InvalidRequestError("`prompt` is empty", "prompt")
    return items[0]


def _checked_token_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is out of the vocabulary [0, {vocab_size})", "prompt")
    return list(ids)


def _plain_message(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message for the chat template: text content parts joined into one string."""
    plain = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        for part in message.content:
            if part.type != "text" or part.text is None:
                raise UnsupportedParameterError(
                    f"messages[{index}].content: only text parts are supported, got type {part.type!r}",
                    "messages",
                )
        plain["content"] = "".join(part.text or "" for part in message.content)
    return plain


def _check_context(ids: list[int], max_model_len: int, param: str) -> None:
    if len(ids) >= max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
            f"{len(ids)} tokens (at most {max_model_len - 1} leave room for one new token); shorten it.",
            param,
        )


def _prepared(
    body: CompletionRequest | ChatCompletionRequest, model: str, ids: list[int], max_tokens: int
) -> PreparedRequest:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=stop,
        ignore_eos=bool(body.ignore_eos),
        attention_policy=_attention_policy(body),
    )  # raises InvalidRequestError naming the field
    include_usage = body.stream and body.stream_options is not None and body.stream_options.include_usage
    return PreparedRequest(model, ids, params, body.stream, include_usage)


def _attention_policy(body: CompletionRequest | ChatCompletionRequest) -> PolicySpec | None:
    """The extension field `attention_policy`; an unknown name or a bad budget is a 400 naming it."""
    policy = body.attention_policy
    if policy is None:
        return None
    return PolicySpec.parse(policy.name, policy.budget, policy.scoring)
