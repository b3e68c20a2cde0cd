"""Render one conversation through a chat template into token ids and the mask of tokens to learn.

The mask comes from the template itself, for any template, with no assumed header, bos or eos string:
- the conversation F is rendered once, and once more with every message's own text (content, reasoning,
  tool-call names and arguments) wrapped in invisible tags: where the tags land is where each message's text
  sits in F (a template that edits the text is diffed message by message instead);
- assistant turn i starts where F departs from the inference prompt `render(messages[:i],
  add_generation_prompt=True)`, but never after the turn's own first character: what the generation prompt
  supplies (the role header, an empty think block) is context, everything the template writes after it
  (`<think>`, `[TOOL_CALLS]`, `<|START_RESPONSE|>`, the reply itself) is what the model must produce. A
  template without a generation prompt (Mistral's `[INST]`) gives an empty one: the reply follows `[/INST]`.
  If F renders the history differently from that prompt (Qwen3 drops old think blocks once a later user
  message exists, Mistral moves the tools to the last user message, Hermes closes a tool result differently
  when it is last), the turn is taken as F renders it: it starts after the generation prompt found in F just
  before the reply; with no generation prompt, after what the template writes before the reply when the
  turn is last (`[TOOL_CALLS]name...`) if F has it there too; otherwise at the reply itself;
- the turn ends with the first end-of-turn token after its own text and before the next message's text:
  an end-of-turn token is one that also ends the user's turns, or the eos token; a template that ends
  assistant turns with other tokens (`<|eom_id|>`, harmony's `<|call|>`) ends them with the first special
  token after the reply. So several end markers per template work, and the model learns to stop.
Character spans are mapped onto the tokens of F, tokenized once by the fast tokenizer. A very long
conversation is cut, per string and as a whole, a safe number of characters after max_length tokens
(no token is longer than the vocabulary's longest), so its cost follows what is kept, not its length.
"""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jinja2
import numpy as np
from transformers.utils.chat_template_utils import _compile_jinja_template

from dataset.records import BadRecord
from model.errors import UserError

PROBE_QUESTION, PROBE_ANSWER = "PROBE-QUESTION-8d1f", "PROBE-ANSWER-8d1f"
PROBE = [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_ANSWER}]
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe_tool",
            "description": "Probe.",
            "parameters": {"type": "object", "properties": {"x": {"type": "string", "description": "X."}}},
        },
    }
]
# Private-use characters: no tokenizer or template gives them a meaning; data holding them is diffed instead
TAG_OPEN, TAG_CLOSE = "\ue000", "\ue001"
TAG = re.compile(f"{TAG_OPEN}(\\d+){TAG_CLOSE}")
SAFETY_TOKENS = 64  # tokens kept beyond max_length before a cut, so that the cut cannot change the kept tokens


class TemplateError(UserError):
    """A tokenizer or chat template that cannot produce a training mask."""


@dataclass(frozen=True)
class OwnPrompt:
    """What a chat template writes on its own before the first user message of a conversation without a system
    message (a default system prompt, a date line), besides bos and the header of every user turn."""

    tokens: int = 0  # its tokens: 0 for a template that writes none
    replaced_by_system: bool = False  # a system message of the data's own takes its place


@dataclass(frozen=True)
class ChatFormat:
    """A compiled chat template plus what was derived from it once: end-of-turn tokens, special tokens."""

    name: str  # how messages name the template
    template: Any  # compiled jinja2 template, the same environment transformers renders with
    variables: dict[str, Any]  # bos_token, eos_token, ...: transformers passes these to every template
    special_tokens: re.Pattern  # any special-token string, to refuse data that fakes markers
    added_tokens: re.Pattern  # any added token (special or not: `<think>`), each always one whole token
    longest_added: int  # characters of the longest added token
    end_tokens: frozenset[str]  # tokens that end a turn: the one ending user turns, and eos
    no_tools: list | None  # how to say "no tools" to this template: None, or [] if it needs a list
    needs_tools: bool  # the template renders only conversations that offer tools
    max_token_chars: int  # characters of the longest token: max_length tokens never span more than this many
    backend: Any  # the fast tokenizer (tokenizers.Tokenizer)
    arguments: str = "as given"  # tool-call arguments as the template reads them: "object", "string", "as given"
    # What the template leaves out of the text: "tools", the schemas offered (DeepSeek-R1's), "reasoning", an
    # assistant's reasoning_content (Qwen2.5's, Llama's); the samples that have it are noted (`unrendered`)
    drops: frozenset[str] = frozenset()
    reply_end: str = ""  # the end-of-turn token written after an assistant's reply: where generation stops
    own_prompt: OwnPrompt = OwnPrompt()  # what the template writes before the conversation on its own

    def render(
        self, messages: list[dict[str, Any]], tools: list | None = None, add_generation_prompt: bool = False
    ) -> str:
        """Render messages to text exactly as `tokenizer.apply_chat_template(tokenize=False)` does."""
        return self.template.render(
            messages=messages,
            tools=tools if tools else self.no_tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )

    def char_limit(self, max_length: int) -> int:
        """Characters of F that certainly hold its first max_length tokens (and SAFETY_TOKENS more)."""
        return (max_length + SAFETY_TOKENS) * self.max_token_chars


LORA_TEMPLATE = "chat_template.jinja"  # saved with a LoRA trained with --chat_template: how its chats looked


def load_chat_format(tokenizer: Any, chat_template: str | None = None, name: str | None = None) -> ChatFormat:
    """Compile the chat template (the tokenizer's unless given) and check once that it can be masked."""
    source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    name = name or ("the chat template given (--chat_template)" if chat_template else f"{source}'s chat template")
    text = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # tokenizers with several named templates
        text = text.get("default")
    if not text:
        raise TemplateError(f"{source} has no chat template: pass a template file with --chat_template")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TemplateError(f"{source} is a slow tokenizer: load a fast one (a directory with tokenizer.json)")
    special = {*tokenizer.all_special_tokens}
    special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special.discard("")
    if not special:
        raise TemplateError(f"{source} has no special tokens, so no turn can end with an end-of-turn token")
    # Longest first, so that a token that contains another one is matched whole
    pattern = re.compile("|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)))
    added = {t.content for t in tokenizer.added_tokens_decoder.values()} | special
    added_pattern = re.compile("|".join(re.escape(s) for s in sorted(added, key=len, reverse=True)))
    try:
        template = _compile_jinja_template(text)
    except Exception as e:  # a syntax error, an unknown filter...
        raise TemplateError(f"{name} does not compile: {type(e).__name__}: {e}") from None
    longest = max(len(t) for t in backend.get_vocab())
    # A normalizer may drop characters, so a token can cover more of the original text than its own length
    longest *= 1 if backend.normalizer is None else 4
    fmt = ChatFormat(
        name, template, dict(tokenizer.special_tokens_map), pattern, added_pattern, max(map(len, added)),
        frozenset(), None, False, longest, backend,
    )
    fmt = _probe(fmt)
    eos = tokenizer.special_tokens_map.get("eos_token")
    probe_text = fmt.render(PROBE, PROBE_TOOLS if fmt.needs_tools else None)
    user_end = pattern.search(probe_text, probe_text.find(PROBE_QUESTION) + len(PROBE_QUESTION))
    ends = {e for e in (eos, user_end and user_end.group()) if isinstance(e, str) and e}
    fmt = ChatFormat(**{**fmt.__dict__, "end_tokens": frozenset(ends), "arguments": _probe_arguments(fmt),
                        "drops": _drops(fmt)})
    try:  # the probe conversation must be maskable, or no conversation is
        supervised_spans(fmt, PROBE, PROBE_TOOLS if fmt.needs_tools else None)
    except BadRecord as e:
        raise TemplateError(f"{name} cannot be masked: {e}") from None
    # The token training learns to end a reply with is the one a reply must stop at
    reply_end = _turn_end(fmt, probe_text, probe_text.find(PROBE_ANSWER) + len(PROBE_ANSWER), len(probe_text), 1)
    fmt = ChatFormat(**{**fmt.__dict__, "reply_end": reply_end.group()})
    return ChatFormat(**{**fmt.__dict__, "own_prompt": _own_prompt(fmt)})


PROBE_SECOND, PROBE_SYSTEM = "PROBE-SECOND-QUESTION-8d1f", "PROBE-SYSTEM-8d1f"


def _own_prompt(fmt: ChatFormat) -> OwnPrompt:
    """What the template writes before the first user message on its own: the text before it, less bos and less
    the header it also writes before a later user message (after the reply's end token); and whether a system
    message of one's own replaces it (its text, special tokens aside, is then gone)."""
    tools = PROBE_TOOLS if fmt.needs_tools else None
    try:
        text = fmt.render([*PROBE, {"role": "user", "content": PROBE_SECOND}], tools)
    except Exception:  # a template that refuses a conversation ending with the user: no prompt is measured
        return OwnPrompt()
    lead = text[: text.find(PROBE_QUESTION)]
    bos = fmt.variables.get("bos_token")
    if isinstance(bos, str) and bos and lead.startswith(bos):
        lead = lead[len(bos) :]
    between = text[text.find(PROBE_ANSWER) + len(PROBE_ANSWER) : text.find(PROBE_SECOND)]
    header = between.partition(fmt.reply_end)[2] or between  # what opens a user turn, after the reply's end token
    cut = len(lead) - common_suffix_len(lead, header)
    for token in fmt.added_tokens.finditer(lead):  # a token whose tail alone matches is the prompt's, not the header's
        if token.start() < cut < token.end():
            cut = token.end()
    own = lead[:cut]
    if not fmt.special_tokens.sub("", own).strip():
        return OwnPrompt()  # only markers: a system turn's empty frame, a role header
    try:
        with_system = fmt.render([{"role": "system", "content": PROBE_SYSTEM}, *PROBE], tools)
        replaced = fmt.special_tokens.sub("", own).strip() not in fmt.special_tokens.sub("", with_system)
    except Exception:  # a template that refuses system messages: nothing replaces its prompt
        replaced = False
    return OwnPrompt(len(fmt.backend.encode(own, add_special_tokens=False).ids), replaced)


def _probe(fmt: ChatFormat) -> ChatFormat:
    """Find how the template renders a plain exchange: tools None, tools [], or only with tools offered."""
    errors = []
    for no_tools, tools in ((None, None), ([], None), (None, PROBE_TOOLS)):
        candidate = ChatFormat(**{**fmt.__dict__, "no_tools": no_tools, "needs_tools": tools is not None})
        try:
            text = candidate.render(PROBE, tools)
            candidate.render(PROBE[:1], tools, add_generation_prompt=True)
        except Exception as e:  # templates raise anything: TypeError, UndefinedError, raise_exception(...)
            errors.append(_describe(e))
            continue
        if PROBE_ANSWER not in text:
            raise TemplateError(f"{fmt.name} does not render the assistant's content")
        return candidate
    raise TemplateError(f"{fmt.name} cannot render a plain user/assistant exchange: {errors[0]}")


PROBE_ARGUMENTS = {"x": "PROBE-ARGUMENT-8d1f"}


def _probe_call(arguments: Any, content: str | None) -> list[dict[str, Any]]:
    """A call of PROBE_TOOLS' tool, its result and an answer (an id of 9 letters and digits, as Mistral's need)."""
    call = {"id": "probe0001", "type": "function", "function": {"name": "probe_tool", "arguments": arguments}}
    return [PROBE[0], {"role": "assistant", "content": content, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "probe0001", "name": "probe_tool", "content": "PROBE-RESULT-8d1f"},
            PROBE[1]]


def _probe_arguments(fmt: ChatFormat) -> str:
    """How the template wants tool-call arguments: "object" if it JSON-encodes them (a JSON string, as OpenAI's
    format writes them, would be encoded a second time and learned as a quoted string), "string" if it joins them
    to text (an object would fail or print as a Python dict), else "as given" (it takes either, or no calls)."""
    as_string = json.dumps(PROBE_ARGUMENTS)
    texts = {}
    for form, arguments in (("object", PROBE_ARGUMENTS), ("string", as_string)):
        for content in (None, ""):
            try:
                text = fmt.render(_probe_call(arguments, content), PROBE_TOOLS)
            except Exception:  # this form of empty content, or of arguments, is one the template refuses
                continue
            if PROBE_ARGUMENTS["x"] in text:  # the call is rendered (DeepSeek's only with content null)
                texts[form] = text
                break
    object_ok = "object" in texts and repr(PROBE_ARGUMENTS) not in texts["object"]
    if object_ok and json.dumps(as_string) in texts.get("string", ""):
        return "object"
    if not object_ok and as_string in texts.get("string", ""):
        return "string"
    return "as given"


PROBE_REASONING = "PROBE-REASONING-8d1f"


def _drops(fmt: ChatFormat) -> frozenset[str]:
    """What of a conversation the template leaves out of the text (see ChatFormat.drops)."""
    tools = PROBE_TOOLS if fmt.needs_tools else None
    reasoning = _with_thinking([PROBE[0], {**PROBE[1], "reasoning_content": PROBE_REASONING}])
    dropped = {
        "tools": lambda: not fmt.needs_tools and fmt.render(PROBE, PROBE_TOOLS) == fmt.render(PROBE, None),
        "reasoning": lambda: PROBE_REASONING not in fmt.render(reasoning, tools),
    }
    drops = set()
    for kind, is_dropped in dropped.items():
        try:
            if is_dropped():
                drops.add(kind)
        except Exception:  # the lines that have it are then refused one by one, with the template's reason
            pass
    return frozenset(drops)


def unrendered(fmt: ChatFormat, messages: list[dict[str, Any]], tools: list | None) -> list[str]:
    """What this conversation has that the template leaves out of the text (see ChatFormat.drops)."""
    has = {"tools": bool(tools), "reasoning": any("reasoning_content" in m for m in messages)}
    return [kind for kind in sorted(fmt.drops) if has[kind]]


def _with_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with their reasoning also as `thinking`, as transformers hands it to templates (gpt-oss reads
    that name)."""
    return [{"thinking": m["reasoning_content"], **m} if "reasoning_content" in m else m for m in messages]


def _arguments_as(form: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every tool call's arguments in `form` (records.py has checked that each is a JSON object,
    or a string holding one)."""
    if form == "as given" or not any(m.get("tool_calls") for m in messages):
        return messages
    want = dict if form == "object" else str

    def convert(arguments: Any) -> Any:
        if isinstance(arguments, want):
            return arguments
        return json.loads(arguments) if want is dict else json.dumps(arguments, ensure_ascii=False)

    return [{**m, "tool_calls": [{**call, "function": {**call["function"],
                                                       "arguments": convert(call["function"].get("arguments", {}))}}
                                 for call in m["tool_calls"]]} if m.get("tool_calls") else m
            for m in messages]


# ---------------------------------------------------------------------------------------------------------
# Where each message's own text lands in the rendered conversation
# ---------------------------------------------------------------------------------------------------------
def _tag(k: int) -> str:
    return f"{TAG_OPEN}{k}{TAG_CLOSE}"


def _wrap(value: Any, tag: str) -> Any:
    """The value with every non-empty string in it wrapped in tag (dicts, their keys, lists recursively)."""
    if isinstance(value, str):
        return f"{tag}{value}{tag}" if value else value
    if isinstance(value, dict):  # keys too: arguments {"n": 5} hold no string value but their key is text
        return {_wrap(key, tag): _wrap(v, tag) for key, v in value.items()}
    if isinstance(value, list):
        return [_wrap(v, tag) for v in value]
    return value


def _mark(message: dict[str, Any], tag: str) -> dict[str, Any]:
    """A copy of the message whose own text (not its role, ids or type) is wrapped in tag."""
    marked = dict(message)
    for key in ("content", "reasoning_content", "thinking"):
        if key in message:
            marked[key] = _wrap(message[key], tag)
    if message.get("tool_calls"):
        marked["tool_calls"] = [
            {**call, "function": {key: _wrap(v, tag) if key in ("name", "arguments") else v
                                  for key, v in call["function"].items()}}
            for call in message["tool_calls"]
        ]
    return marked


def message_regions(
    fmt: ChatFormat, messages: list[dict[str, Any]], tools: list | None, full: str, limit: int | None = None
) -> list[tuple[int, int] | None]:
    """(first, last) character of each message's own text in the rendered conversation `full` (None: absent).

    One render with every message tagged, if removing the tags gives `full` back; otherwise one render per
    message (a template that edits the text: strips it, splits it), diffed against `full`. Messages after one
    that starts past `limit` are not looked for.
    """
    tagged = fmt.render([_mark(m, _tag(k)) for k, m in enumerate(messages)], tools)
    if TAG.sub("", tagged) == full and TAG_OPEN not in full:
        regions: list[list[int] | None] = [None] * len(messages)
        removed = 0
        for match in TAG.finditer(tagged):
            at, k = match.start() - removed, int(match.group(1))
            removed += len(match.group())
            region = regions[k]
            regions[k] = [min(region[0], at), max(region[1], at)] if region else [at, at]
        # One tag alone is a text the template took apart (Qwen3 splits `<think>` off the content): its place
        return [tuple(r) if r else None for r in regions]
    out: list[tuple[int, int] | None] = []
    for k, message in enumerate(messages):
        if limit is not None and out and out[-1] and out[-1][0] >= limit:
            out.append(None)
            continue
        marked = fmt.render(messages[:k] + [_mark(message, _tag(k))] + messages[k + 1 :], tools)
        start = common_prefix_len(full, marked)
        end = len(full) - common_suffix_len(full[start:], marked[start:])
        out.append((start, max(start, end)) if marked != full else None)
    return out


# ---------------------------------------------------------------------------------------------------------
# The supervised spans
# ---------------------------------------------------------------------------------------------------------
def supervised_spans(
    fmt: ChatFormat, messages: list[dict[str, Any]], tools: list | None = None, limit: int | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return (text, [(start, end)] character spans of the assistant turns).

    With `limit`, strings and the text are cut after `limit` characters (see ChatFormat.char_limit), and
    turns that start past it are left out.
    """
    if fmt.needs_tools and not tools:
        raise BadRecord(f"{fmt.name} renders only conversations that offer tools, and this one has none")
    messages = _arguments_as(fmt.arguments, messages)  # before the cut below, which may cut a JSON string
    if limit is not None:
        # A message renders at least one token, so those past max_length + SAFETY_TOKENS lie past the cut. Only
        # a degenerate line has that many; a template that looks ahead (Qwen3's last user message) may then
        # render its kept part as if the conversation ended there
        messages, tools = _cut(messages[: limit // fmt.max_token_chars], limit), _cut(tools, limit)
    refuse_special_tokens(fmt, messages, tools)
    messages = _with_thinking(messages)
    try:
        full, messages, regions = _render_with_calls(fmt, messages, tools, limit)
        spans = _spans(fmt, messages, tools, full, regions, limit)
    except BadRecord:
        raise
    except Exception as e:  # the template's own checks (raise_exception) and its type errors on this data
        raise BadRecord(f"the chat template refused this conversation: {_describe(e)}") from None
    if limit is not None and len(full) > limit:
        full = full[:limit]
        spans = [(s, min(e, limit)) for s, e in spans if s < limit]
    return full, spans


def _render_with_calls(
    fmt: ChatFormat, messages: list[dict[str, Any]], tools: list | None, limit: int | None
) -> tuple[str, list[dict[str, Any]], list[tuple[int, int] | None]]:
    """Render, and check that every tool call is rendered (a template without tool support would drop it
    silently). An assistant message that only calls tools has empty content: some templates need it null
    (DeepSeek renders the calls only then), others a string (they test it for text); the data's form is
    tried first, then every such message null, then every one "" (a record may mix the two)."""
    calls = [k for k, m in enumerate(messages) if m.get("tool_calls")]
    empty = [k for k in calls if not messages[k].get("content")]
    attempts = [messages]
    for content in (None, "") if empty else ():
        uniform = [{**m, "content": content} if k in empty else m for k, m in enumerate(messages)]
        if uniform not in attempts:
            attempts.append(uniform)
    failures = []
    for attempt in attempts:
        form = f"with content {_empty_form([attempt[k]['content'] for k in empty])}" if empty else ""
        try:
            full = fmt.render(attempt, tools)
            regions = message_regions(fmt, attempt, tools, full, limit)
        except Exception as e:
            failures.append((e, f"{form} it fails: {_describe(e)}"))
            continue
        silent = [k for k in calls if not _calls_rendered(fmt, attempt, tools, full, k)]
        if not silent:
            return full, attempt, regions
        failures.append((None, f"{form} it does not render the tool calls of assistant message {silent[0]}"))
    if all(error is not None for error, _ in failures):
        raise failures[0][0]  # whatever the form, the template refuses the conversation
    raise BadRecord("the chat template cannot render this conversation's tool calls: " + "; ".join(
        text.strip() for _, text in failures))


def _empty_form(contents: list[str | None]) -> str:
    """How a render attempt writes the empty content of the messages that only call tools: None, '', or both."""
    forms = sorted({repr(c) for c in contents})
    return forms[0] if len(forms) == 1 else " and ".join(forms) + " (as the data mixes them)"


def _calls_rendered(fmt: ChatFormat, messages: list[dict[str, Any]], tools: list | None, full: str, k: int) -> bool:
    """Whether the tool calls of message k appear in the render (their text changes it)."""
    message = messages[k]
    marked = {**message, "tool_calls": _mark({"tool_calls": message["tool_calls"]}, _tag(k))["tool_calls"]}
    return fmt.render(messages[:k] + [marked] + messages[k + 1 :], tools) != full


def _spans(
    fmt: ChatFormat,
    messages: list[dict[str, Any]],
    tools: list | None,
    full: str,
    regions: list[tuple[int, int] | None],
    limit: int | None,
) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        region = regions[i]
        if region is None and limit is not None and any(r and r[0] >= limit for r in regions[:i]):
            break  # an earlier message starts past the cut: message_regions did not look for this one
        if _renders_empty(fmt, messages, tools, full, i):
            raise BadRecord(f"assistant message {i}: nothing to learn: the chat template renders it empty (it drops "
                            "reasoning, and the message has no other text)")
        if region is None:
            raise BadRecord(f"assistant message {i}: the chat template does not render it")
        if limit is not None and region[0] >= limit:
            break  # this turn and all later ones lie past the kept tokens
        # Messages a template moves elsewhere (a system prompt put into the last user turn) do not count
        prev_end = max([r[1] for r in regions[:i] if r and r[0] < region[0]] + [spans[-1][1] if spans else 0])
        start = _turn_start(fmt, messages, tools, full, region, prev_end, i)
        following = [r[0] for r in regions[i + 1 :] if r and r[0] >= region[1]]
        bound = min(following) if following else len(full)
        spans.append((start, _turn_end(fmt, full, region[1], bound, i).end()))
    return spans


def _renders_empty(
    fmt: ChatFormat, messages: list[dict[str, Any]], tools: list | None, full: str, i: int
) -> bool:
    """Whether assistant message i, with no text but its reasoning (`reasoning_content`, or a think block as its
    content), renders as if it had none: the template drops reasoning there (Qwen3 before the last user message)."""
    message = messages[i]
    if message.get("tool_calls") or (message.get("content") or "").split("</think>")[-1].strip():
        return False
    bare = {key: value for key, value in message.items() if key not in ("reasoning_content", "thinking")}
    return fmt.render(messages[:i] + [{**bare, "content": ""}] + messages[i + 1 :], tools) == full


def _turn_start(
    fmt: ChatFormat,
    messages: list[dict[str, Any]],
    tools: list | None,
    full: str,
    region: tuple[int, int],
    prev_end: int,
    i: int,
) -> int:
    """Where assistant turn i starts being learned in `full` (see the module docstring)."""
    prompt = fmt.render(messages[:i], tools, add_generation_prompt=True)
    agree = common_prefix_len(prompt, full)
    # What precedes the generation prompt (rendered only if F departs from the prompt: usually it does not)
    history = agree if agree == len(prompt) else common_prefix_len(fmt.render(messages[:i], tools), prompt)
    if agree >= history:  # the history renders as in F: what follows the generation prompt is learned
        start = min(agree, region[0])
        # Texts agree up to a character, tokens up to a token: an added token that holds the first difference
        # (`<think>` in the prompt where the reply opens `<tool_call>`) is the reply's
        for text in (full, prompt):
            window = max(0, start - fmt.longest_added)
            for match in fmt.added_tokens.finditer(text, window, start + fmt.longest_added):
                if match.start() < start < match.end():
                    start = match.start()
        return start
    # The history renders differently with this turn in it (a tool result closed differently, old think
    # blocks dropped, tools moved): find the generation prompt in F before the reply
    generation_prompt = prompt[history:]
    if generation_prompt:
        at = full.rfind(generation_prompt, prev_end, region[0])
        if at >= 0:
            return at + len(generation_prompt)
        return region[0]
    # No generation prompt (Mistral): what the template writes before the reply when it is the last message
    # (`[TOOL_CALLS]name...`) is learned if F has it too
    last = fmt.render(messages[: i + 1], tools)
    last_regions = message_regions(fmt, messages[: i + 1], tools, last)
    if last_regions[i] is not None and common_prefix_len(prompt, last) >= history:
        before = last[min(len(prompt), last_regions[i][0]) : last_regions[i][0]]
        if before and full.startswith(before, region[0] - len(before)) and region[0] - len(before) >= prev_end:
            return region[0] - len(before)
    return region[0]


def _turn_end(fmt: ChatFormat, full: str, after: int, bound: int, i: int) -> re.Match:
    """The end-of-turn token after assistant text ending at `after` (see the module docstring)."""
    first = None
    for match in fmt.special_tokens.finditer(full, after, max(bound, after)):
        if match.group() in fmt.end_tokens:
            return match
        first = first or match
    if first is not None:
        return first
    raise BadRecord(
        f"assistant message {i}: the chat template writes no special token after it "
        f"({full[after : after + 40]!r}), so the model could not learn to stop; a template made for another "
        "model marks turns with that model's special tokens: pass its tokenizer with --tokenizer_path"
    )


def _describe(error: Exception) -> str:
    """A template's own message (raise_exception), or the Python error it ran into on this data."""
    text = str(error) if isinstance(error, jinja2.TemplateError) else f"{type(error).__name__}: {error}"
    return text if len(text) <= 200 else text[:197] + "..."


def _cut(value: Any, limit: int) -> Any:
    """The value with every string cut to `limit` characters (dicts and lists recursively)."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, dict):
        return {key: _cut(v, limit) for key, v in value.items()}
    if isinstance(value, list):
        return [_cut(v, limit) for v in value]
    return value


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
        for text in _strings(value):
            hit = fmt.special_tokens.search(text)
            if hit:
                raise BadRecord(
                    f"{where} contains the special token {hit.group()!r}: data must not write the template's "
                    "markers itself (it would fake turn boundaries); remove it"
                )


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, v in value.items():
            yield str(key)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


# ---------------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------------
def token_mask(encoding: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    """Boolean mask over the tokens of `encoding` whose first character lies inside one of the spans."""
    mask = np.zeros(len(encoding), dtype=bool)
    for start, end in spans:
        first = next((t for c in range(start, end) if (t := encoding.char_to_token(c)) is not None), None)
        if first is None:
            continue
        if encoding.token_to_chars(first)[0] < start:
            first += 1  # a token that straddles the start also holds header text: it belongs to the prompt
        # The end is a special token (a whole token), or the cut of a long text
        last = next(t for c in range(end - 1, start - 1, -1) if (t := encoding.char_to_token(c)) is not None)
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


def common_suffix_len(a: str, b: str) -> int:
    """Length of the longest common suffix of two strings."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # invariant: a[len(a) - lo:] == b[len(b) - lo:]
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid : len(a) - lo] == b[len(b) - mid : len(b) - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo
