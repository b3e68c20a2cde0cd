"""Render one conversation through a chat template into token ids and the mask of tokens to learn.

The mask comes from the template itself, with no assumed bos token or header string:
- the full conversation F is rendered once;
- assistant turn i starts where `render(messages[:i], add_generation_prompt=True)` stops agreeing with F.
  What the generation prompt supplies at inference (the role header, and e.g. MiniMind's empty think
  block) is context; everything after it is what the model must produce itself, so it is learned;
- the turn ends after the template's end-of-turn marker (found once per template by rendering a probe
  conversation), so the model learns to stop.
Character spans are then mapped onto the tokens of F, tokenized once by the fast tokenizer. Earlier and
later turns may render differently (Qwen3 drops old think blocks): each turn is taken as F renders it.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

import jinja2
import numpy as np
from transformers.utils.chat_template_utils import _compile_jinja_template

from dataset.records import BadRecord
from model.errors import UserError

PROBE_QUESTION, PROBE_ANSWER = "PROBE-QUESTION-8d1f", "PROBE-ANSWER-8d1f"
PROBE = [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_ANSWER}]


class TemplateError(UserError):
    """A tokenizer or chat template that cannot produce a training mask."""


@dataclass(frozen=True)
class ChatFormat:
    """A compiled chat template plus what was derived from it once: end marker, special tokens."""

    template: Any  # compiled jinja2 template, the same environment transformers renders with
    variables: dict[str, Any]  # bos_token, eos_token, ...: transformers passes these to every template
    end_marker: str  # text after an assistant's content up to and including the first special token
    generation_prompt_len: int  # characters that add_generation_prompt appends
    special_tokens: re.Pattern  # any special-token string, to refuse data that fakes markers
    backend: Any  # the fast tokenizer (tokenizers.Tokenizer)

    def render(
        self, messages: list[dict[str, Any]], tools: list | None = None, add_generation_prompt: bool = False
    ) -> str:
        """Render messages to text exactly as `tokenizer.apply_chat_template(tokenize=False)` does."""
        return self.template.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )


def load_chat_format(tokenizer: Any, chat_template: str | None = None) -> ChatFormat:
    """Compile the chat template (the tokenizer's unless given) and derive its end-of-turn marker."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    text = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # tokenizers with several named templates
        text = text.get("default")
    if not text:
        raise TemplateError(f"{name} has no chat template: pass a template file with --chat_template")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TemplateError(f"{name} is a slow tokenizer: load a fast one (a directory with tokenizer.json)")
    special = {*tokenizer.all_special_tokens}
    special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special.discard("")
    if not special:
        raise TemplateError(f"{name} has no special tokens, so no turn can end with an end-of-turn token")
    # Longest first, so that a token that contains another one is matched whole
    pattern = re.compile("|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)))
    fmt = ChatFormat(
        _compile_jinja_template(text), dict(tokenizer.special_tokens_map), "", 0, pattern, backend
    )
    try:
        probe = fmt.render(PROBE)
        prompt = fmt.render(PROBE[:1], add_generation_prompt=True)
        no_prompt = fmt.render(PROBE[:1])
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template cannot render a plain user/assistant exchange: {e}") from None
    after = probe.rfind(PROBE_ANSWER)
    if after < 0:
        raise TemplateError("the chat template does not render the assistant's content")
    after += len(PROBE_ANSWER)
    marker = pattern.search(probe, after)
    if marker is None:
        raise TemplateError(
            f"the chat template writes no special token after an assistant turn ({probe[after:]!r}), so the "
            "model could not learn to stop: use a template whose turns end with an end-of-turn token"
        )
    prompt_len = len(prompt) - common_prefix_len(prompt, no_prompt)
    if prompt_len == 0:
        raise TemplateError(
            "the chat template ignores add_generation_prompt, so assistant turns cannot be located"
        )
    return ChatFormat(fmt.template, fmt.variables, probe[after : marker.end()], prompt_len, pattern, backend)


def supervised_spans(
    fmt: ChatFormat, messages: list[dict[str, Any]], tools: list | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return (text, [(start, end)] character spans of the assistant turns)."""
    refuse_special_tokens(fmt, messages, tools)
    # transformers also hands reasoning to templates as `thinking` (gpt-oss reads that name)
    messages = [
        {"thinking": m["reasoning_content"], **m} if "reasoning_content" in m else m for m in messages
    ]
    try:
        full = fmt.render(messages, tools)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = fmt.render(messages[:i], tools, add_generation_prompt=True)
            start = common_prefix_len(prompt, full)
            # Only the generation prompt may differ from F (e.g. an empty think block where F has a full one);
            # if the history itself differs, the template is not prefix-stable and the turn cannot be found.
            if start < len(prompt) - fmt.generation_prompt_len or (spans and start < spans[-1][1]):
                raise BadRecord(
                    f"assistant message {i}: the chat template renders the conversation before it differently "
                    "when it is the last message, so its start cannot be located"
                )
            end = full.find(fmt.end_marker, start)
            if end < 0:
                raise BadRecord(f"assistant message {i}: no end-of-turn marker {fmt.end_marker!r} after it")
            spans.append((start, end + len(fmt.end_marker)))
    except jinja2.TemplateError as e:
        raise BadRecord(f"the chat template refused this conversation: {e}") from None
    return full, spans


def refuse_special_tokens(fmt: ChatFormat, messages: list[dict[str, Any]], tools: list | None = None) -> None:
    """Raise BadRecord if any text in the data contains a special-token string (it would fake turn markers)."""
    fields = [
        (f"message {i} ({m.get('role')}) {key}", value)
        for i, m in enumerate(messages)
        for key, value in m.items()
    ]
    for where, value in [*fields, ("tools", tools)]:
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        hit = fmt.special_tokens.search(text)
        if hit:
            raise BadRecord(
                f"{where} contains the special token {hit.group()!r}: data must not write the template's "
                "markers itself (it would fake turn boundaries); remove it"
            )


def token_mask(encoding: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    """Boolean mask over the tokens of `encoding` whose first character lies inside one of the spans."""
    mask = np.zeros(len(encoding), dtype=bool)
    for start, end in spans:
        first = next((t for c in range(start, end) if (t := encoding.char_to_token(c)) is not None), None)
        if first is None:
            continue
        if encoding.token_to_chars(first)[0] < start:
            first += 1  # a token that straddles the start also holds header text: it belongs to the prompt
        last = encoding.char_to_token(end - 1)  # the end marker is a special token, so always a whole token
        mask[first : last + 1] = True
    return mask


def render_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    tools: list | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of the tokens the model learns."""
    fmt = load_chat_format(tokenizer, chat_template)
    text, spans = supervised_spans(fmt, messages, tools)
    encoding = fmt.backend.encode(text, add_special_tokens=False)
    return list(encoding.ids), token_mask(encoding, spans).astype(int).tolist()


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (binary search over C-speed comparisons)."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # invariant: a[:lo] == b[:lo]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
