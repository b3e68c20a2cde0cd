"""Read jsonl training data, normalise every supported format to chat messages, and report bad input.

A conversation is a list of messages `{"role", "content", optional "reasoning_content", "tool_calls"}`
with role in system/user/assistant/tool, plus the tool schemas offered to the model (or None).
Accepted line formats:
  MiniMind  {"conversations": [{"role", "content", "reasoning_content"?, "tool_calls"?, "tools"?}, ...]}
  OpenAI    {"messages": [{"role", "content", "tool_calls"?}, ...], "tools"?: [...]}; any role's content may be a
            list of text parts [{"type": "text", "text": str}, ...] (an assistant's also {"type": "refusal"}),
            read as their texts joined with nothing between, as OpenAI and the templates that take parts read them
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}, ...],
             "system"?: str, "tools"?: [...]}
  Alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
  Pretrain  {"text": str}  (read_texts)
A `.json` file holding one JSON array of such objects is read as records too (line = where each begins).
Objects written over several lines (`jq .`) are records too, in any mix with one-line objects.
Tool-call arguments stay as the data gives them (a JSON string or an object; chat_render hands them to each
template in the form it prints), with the call ids and tool_call_id kept.
Every problem is collected as (line, message) so that one DataError can list them all before training.
"""

import bisect
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MAX_SHOWN = 20
TEXT_PARTS = ("text", "input_text", "output_text", "refusal")  # content part types that hold text
# Files that are not text, by their first bytes: (what the file is, how to make JSON Lines of it)
BINARY_FORMATS = {
    b"\x1f\x8b": ("gzip-compressed", "decompress it first (gunzip -k FILE) and pass the .jsonl file"),
    b"PK\x03\x04": ("a zip archive", "extract the .jsonl file from it first"),
    b"PAR1": ("a Parquet file", "convert it to JSON Lines first (pandas: pd.read_parquet('FILE').to_json("
                               "'data.jsonl', orient='records', lines=True, force_ascii=False))"),
}
SKIP_HINT = "Fix these lines, or pass --skip_bad_data (skip_invalid=True) to skip bad lines and count them."
MAX_DEPTH = 100  # nesting of JSON arrays/objects a record may have (deeper ones only crash deeper code)
BLANK_OR_BOM = b"\xef\xbb\xbf \t\r\n"  # what may surround a record on its line
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class DataError(UserError):
    """Training data that cannot be used as it is (the message lists `file:line: problem`)."""


class BadRecord(DataError):
    """One record's problem, without file and line: readers collect these into one DataError."""


@dataclass
class Conversation:
    """One normalised chat sample and the line of the file it came from."""

    line: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


Problems = list[tuple[int, str]]


def data_error(path: str | Path, problems: Problems, n_lines: int) -> DataError:
    """Build the one DataError that lists every bad line (the first MAX_SHOWN of them)."""
    lines = [f"{path}: {len(problems)} bad line(s) of {n_lines}:"]
    lines += [f"  {path}:{line}: {problem}" for line, problem in problems[:MAX_SHOWN]]
    if len(problems) > MAX_SHOWN:
        lines.append(f"  ... and {len(problems) - MAX_SHOWN} more")
    lines.append(SKIP_HINT)
    return DataError("\n".join(lines))


def read_lines(path: str | Path) -> list[tuple[int, bytes]]:
    """The non-blank lines of a jsonl file as (line number, raw bytes); parsing is left to the workers."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass the .jsonl file in it")
    if not path.is_file():
        raise DataError(f"{path}: no such file (check --data_path)")
    try:
        with open(path, "rb") as f:  # bytes, so one bad UTF-8 line is reported instead of failing the whole read
            numbered = list(enumerate(f, 1))
    except OSError as e:  # no permission, a disk error
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    for magic, (kind, fix) in BINARY_FORMATS.items():
        if numbered and numbered[0][1].startswith(magic):
            raise DataError(f"{path}: {kind}, not text; {fix.replace('FILE', str(path))}")
    if numbered and numbered[0][1].startswith((b"\xff\xfe", b"\xfe\xff")):  # the byte-order marks of UTF-16
        # What Windows PowerShell 5's `>` writes; read as UTF-8, every line would be a different puzzling error
        raise DataError(f"{path}: UTF-16 text, not UTF-8; convert it first (iconv -f UTF-16 -t UTF-8 {path} > "
                        f"data.jsonl, or in PowerShell: Get-Content {path} | Set-Content -Encoding utf8 data.jsonl)")
    lines = [(n, raw) for n, raw in numbered if raw.strip()]
    if not lines:
        raise DataError(f"{path}: the file is empty (expected one JSON object per line)")
    if lines[0][1].lstrip(BLANK_OR_BOM).startswith(b"["):
        # One JSON array of records: read the text from there whole (blank lines included, so that each record is
        # named by the line it begins on)
        records = json_array_records(path, b"".join(raw for n, raw in numbered[lines[0][0] - 1 :]), lines[0][0])
        if records is not None:
            return records
    if not any(_opens_object(raw) for _, raw in lines):
        return lines  # JSON Lines: a record per line
    records = _split_records(numbered)
    _refuse_wrapper(path, records)
    return records


def parse_line(raw: bytes, line: int | None = None) -> Any:
    """Decode one record (a line, or an object written over several lines that begins on `line`); raise BadRecord
    naming the problem."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a byte-order mark written by some editors is not part of the JSON
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    return loads(text.strip(), first_line=line)  # without the newline, so the error column points into the line


def loads(text: str, where: str = "", first_line: int | None = None) -> Any:
    """json.loads, with everything Python's json accepts but later code cannot use reported as BadRecord. An error
    on a later line of a record written over several lines names that line (`first_line`: the record's first)."""
    prefix = f"{where}: " if where else ""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}"
        if e.lineno > 1:
            at = f"line {first_line + e.lineno - 1}, {at}" if first_line else f"line {e.lineno} of the record, {at}"
        raise BadRecord(f"{prefix}invalid JSON: {e.msg} ({at})") from None
    except RecursionError:
        raise BadRecord(f"{prefix}JSON nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as e:  # Python refuses to convert integers of more than 4300 digits
        raise BadRecord(f"{prefix}invalid JSON: {str(e).split(':')[0]}") from None
    if SURROGATE_ESCAPE.search(text):
        try:  # json accepts a lone "\\ud800", but it is no character: UTF-8 (and a tokenizer) has none
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord(f"{prefix}a string holds a lone surrogate escape (\\u{ord(e.object[e.start]):04x}), "
                            "which is not a character") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(obj) > MAX_DEPTH:
        raise BadRecord(f"{prefix}JSON nested too deeply (more than {MAX_DEPTH} levels)")
    return obj


def _depth(obj: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                break
            stack += [(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


def json_array_records(path: str | Path, data: bytes, first_line: int = 1) -> list[tuple[int, bytes]] | None:
    """The elements of a file holding one JSON array, as (line where each begins, raw bytes); None if the
    file is not one array (JSON Lines whose first line is an array). A `.json` file that is not one valid array
    (broken, not UTF-8, more text after it) is a DataError: read as lines, each record would fail on its comma."""
    is_json = Path(path).suffix.lower() == ".json"
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        if not is_json:
            return None
        line = first_line + data.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte "
                        f"0x{data[e.start]:02x}); a .json file is read whole, so fix that byte, or convert the "
                        "file to JSON Lines (one object per line), where --skip_bad_data can skip a bad line") from None
    decoder, records, pos, line, done = json.JSONDecoder(), [], text.index("[") + 1, first_line, False
    counted = 0
    try:
        while True:
            pos = _skip_space(text, pos)
            if text.startswith("]", pos) and not records:
                pos, done = pos + 1, True
                break
            line += text.count("\n", counted, pos)
            counted = pos
            _, end = decoder.raw_decode(text, pos)
            records.append((line, text[pos:end].encode("utf-8", "surrogatepass")))
            pos = _skip_space(text, end)
            if text.startswith("]", pos):
                pos, done = pos + 1, True
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos += 1
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        if is_json:
            where = f"{path}:{first_line + text.count(chr(10), 0, getattr(e, 'pos', pos))}"
            raise DataError(
                f"{where}: the file is not one valid JSON array ({str(e).split(':')[0]}): fix it, or convert "
                "it to JSON Lines (one object per line)"
            ) from None
        return None
    if not done or _skip_space(text, pos) != len(text):
        if is_json:
            after = first_line + text.count("\n", 0, _skip_space(text, pos))
            raise DataError(f"{path}:{after}: more text after the JSON array that ends on line "
                            f"{first_line + text.count(chr(10), 0, pos)}: a .json file holds one array; remove it")
        return None  # more after the array: JSON Lines
    if not records:
        raise DataError(f"{path}: the file holds an empty JSON array (expected records)")
    return records


def _opens_object(raw: bytes) -> bool:
    """Whether a line opens a JSON object that it does not close: one written over several lines (`jq .`,
    json.dump(indent=2)), or a broken line."""
    text = raw.strip(BLANK_OR_BOM)
    return text.startswith(b"{") and not text.endswith(b"}")


def _split_records(numbered: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The records of a file whose objects may be written over several lines, as (line each begins on, raw bytes).
    Each record is read by its own layout, so a file may mix objects on one line and over several. An object that
    does not parse ends where its indentation says (see _broken_end): it is one bad record, and the records after
    it are read as they are."""
    parts = [raw.decode("utf-8", "surrogateescape") for _, raw in numbered]  # bad bytes stay, for parse_line
    text, starts = "".join(parts), [0, *itertools.accumulate(map(len, parts))]
    decoder, records, i = json.JSONDecoder(), [], 0
    while i < len(numbered):
        line, raw = numbered[i]
        if not _opens_object(raw):
            if raw.strip():
                records.append((line, raw))
            i += 1
            continue
        begins = starts[i] + len(parts[i]) - len(parts[i].lstrip(BLANK_OR_BOM.decode()))
        try:
            _, end = decoder.raw_decode(text, begins)
            last = bisect.bisect_right(starts, end - 1) - 1  # the line the object ends on
        except (ValueError, RecursionError):  # parse_line names the problem, in the worker
            last = _broken_end(numbered, i)
        # Through the end of its last line: text after the object there (`},`) makes it a bad record, named
        records.append((line, text[begins : starts[last + 1]].encode("utf-8", "surrogateescape")))
        i = last + 1
    return records


def _broken_end(numbered: list[tuple[int, bytes]], first: int) -> int:
    """The last line of a broken object that opens on line index `first`: its lines are indented more deeply than
    its opening line, up to a closing `}` at that line's depth (`jq .`, json.dump(indent=2)); the next line at that
    depth or less begins the next record (a broken one-line record is then that line alone). An object written
    without indentation (json.dumps(indent=0)) ends where the next record must begin (see _flat_end)."""
    depth, last = _indent(numbered[first][1]), first
    for j in range(first + 1, len(numbered)):
        raw = numbered[j][1]
        if not raw.strip():
            continue
        if _indent(raw) <= depth:
            if raw.lstrip(BLANK_OR_BOM).startswith((b"}", b"]")):
                return j
            return _flat_end(numbered, first) if numbered[first][1].strip(BLANK_OR_BOM) == b"{" else last
        last = j
    return last


def _flat_end(numbered: list[tuple[int, bytes]], first: int) -> int:
    """The last line of a broken object written without indentation that opens on line index `first` (a lone
    `{`): the line before the first that opens an object or array where no value of this one can stand (a value
    only follows `[`, `,` or `:`), as that one begins the next record; else the file's last line."""
    last, before = first, b"{"
    for j in range(first + 1, len(numbered)):
        line = numbered[j][1].strip(BLANK_OR_BOM)
        if not line:
            continue
        if line.startswith((b"{", b"[")) and not before.endswith((b"[", b",", b":")):
            return last
        last, before = j, line
    return last


def _indent(raw: bytes) -> int:
    return len(raw) - len(raw.lstrip(b" \t"))


def _refuse_wrapper(path: str | Path, records: list[tuple[int, bytes]]) -> None:
    """A DataError if the file is one object written over several lines that wraps the records in a list
    (`{"data": [...]}`): read as one record, it would only say that it has no chat key."""
    if len(records) != 1 or records[0][1].count(b"\n") == 0:
        return
    try:
        obj = json.loads(records[0][1])
    except (ValueError, RecursionError):
        return  # a broken record: parse_line names it
    if not isinstance(obj, dict) or any(key in obj for key in ("conversations", "messages", "instruction", "output",
                                                                "text")):
        return
    lists = _record_lists(obj)
    if lists:
        raise DataError(f"{path}: the file is one JSON object whose records are the list under {_short(lists[0])}: "
                        "save that list as a JSON array (.json), or as JSON Lines (one record per line)")


def _record_lists(obj: dict) -> list[str]:
    """The keys of `obj` holding a list of objects: where a file that wraps its records keeps them."""
    return [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def parse_text(obj: Any) -> str:
    """The text of a pretraining record {"text": ...}; raise BadRecord if invalid."""
    if isinstance(obj, dict) and "text" not in obj and {"conversations", "messages", "instruction"} & obj.keys():
        # A whole chat file given to pretraining: say so once per line, rather than a bare missing key
        raise BadRecord('this is a chat record; pretraining needs {"text": ...} lines (chats train with '
                        "train_full_sft.py or train_lora.py)")
    if not isinstance(obj, dict) or "text" not in obj:
        raise BadRecord('expected a JSON object with a "text" key')
    if not isinstance(obj["text"], str):
        raise BadRecord(f'"text" must be a string, got {type(obj["text"]).__name__}')
    if not obj["text"].strip():
        raise BadRecord('"text" is empty')
    return obj["text"]


def read_conversations(path: str | Path, check_turns: bool = True) -> tuple[list[Conversation], Problems]:
    """Read a chat jsonl file into normalised conversations, collecting (line, problem) for bad lines
    (`check_turns`: as parse_conversation)."""
    conversations, problems = [], []
    for line, raw in read_lines(path):
        try:
            conversations.append(Conversation(line, *parse_conversation(parse_line(raw, line), check_turns)))
        except BadRecord as e:
            problems.append((line, str(e)))
    return conversations, problems


def read_texts(path: str | Path) -> tuple[list[str], Problems]:
    """Read a pretraining jsonl file of {"text": ...} lines, collecting (line, problem) for bad lines."""
    texts, problems = [], []
    for line, raw in read_lines(path):
        try:
            texts.append(parse_text(parse_line(raw, line)))
        except BadRecord as e:
            problems.append((line, str(e)))
    return texts, problems


def parse_conversation(
    obj: Any, check_turns: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Normalise one record of any supported format to (messages, tools); raise BadRecord if invalid.
    `check_turns=False` accepts any order of turns, none from the assistant included: a tokenizer learns from
    the text alone, not from a rendered chat."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    tools = _tools(obj.get("tools"), "top-level 'tools'")
    if "conversations" in obj and "messages" in obj:
        raise BadRecord("both 'conversations' and 'messages': keep the one that holds the chat")
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        turns = obj[key]
        if not isinstance(turns, list) or not turns:
            raise BadRecord(f"'{key}' must be a non-empty list of messages")
        if all(isinstance(t, dict) and "from" in t for t in turns):
            messages = _sharegpt(turns, obj.get("system"))
            added = len(messages) - len(turns)  # the "system" field's message, which the data does not number
        else:
            messages, tools_in_system = _role_messages(turns)
            tools, added = tools or tools_in_system, 0
    elif "instruction" in obj or "output" in obj:
        messages, added = _alpaca(obj), 0
    elif "text" in obj:
        raise BadRecord('this is a pretraining record {"text": ...}; SFT needs conversations')
    else:
        lists = _record_lists(obj)
        wraps = f"; its records seem to be the list under {_short(lists[0])}: write one of them per line" if lists else ""
        raise BadRecord(f"no 'conversations', 'messages' or 'instruction'/'output' key (keys: "
                        f"{_short(sorted(obj))}){wraps}")
    if check_turns:
        _check_order(messages, added)
    return messages, tools


def _role_messages(turns: list) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    # MiniMind and OpenAI share this schema; MiniMind keeps the tool schemas on the system message
    messages, tools = [], None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"message {i}: expected an object, got {type(turn).__name__}")
        role = turn.get("role")
        if role not in ROLES:
            raise BadRecord(f"message {i}: unknown role {_short(role)} (expected one of {', '.join(ROLES)})")
        system_tools = None
        if role == "system":
            system_tools = _tools(turn.get("tools") or turn.get("functions"), f"message {i} 'tools'")
            tools = system_tools or tools
        message = _message(
            i, role, turn.get("content"), turn.get("reasoning_content"), turn.get("tool_calls"),
            # An empty system prompt is one (it keeps a template's default prompt out); MiniMind's tool data
            # leaves it empty when the system message only carries the tools
            may_be_empty=role == "system",
        )
        if role == "tool":
            for key in ("tool_call_id", "name"):  # some templates print or check them
                if isinstance(turn.get(key), str):
                    message[key] = turn[key]
        messages.append(message)
    return messages, tools


def _sharegpt(turns: list, system: Any) -> list[dict[str, Any]]:
    messages = []
    if system is not None and system != "":  # an empty "system" field means none, as in Alpaca records
        messages.append(_message(-1, "system", system, None, None))
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise BadRecord(
                f"message {i}: unknown 'from' {_short(turn['from'])} (expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        if turn["from"] == "function_call":  # the value is the JSON of the call(s) the assistant makes
            messages.append(_message(i, role, "", None, turn.get("value")))
        else:
            messages.append(_message(i, role, turn.get("value"), None, None, may_be_empty=role == "system"))
    return messages


def _alpaca(obj: dict) -> list[dict[str, Any]]:
    for key in ("instruction", "input", "output", "system"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise BadRecord(f"'{key}' must be a string, got {type(obj[key]).__name__}")
    messages = [_message(-1, "system", obj["system"], None, None)] if obj.get("system") else []
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise BadRecord("'history' must be a list of [user, assistant] pairs")
    for i, (user, assistant) in enumerate(history):
        messages += [_message(i, "user", user, None, None), _message(i, "assistant", assistant, None, None)]
    prompt = "\n".join(p for p in (obj.get("instruction"), obj.get("input")) if p and p.strip())
    messages.append(_message(len(history), "user", prompt, None, None))
    messages.append(_message(len(history), "assistant", obj.get("output"), None, None))
    return messages


def _message(
    i: int, role: str, content: Any, reasoning: Any, tool_calls: Any, may_be_empty: bool = False
) -> dict[str, Any]:
    where = f"message {i} ({role})" if i >= 0 else role
    if isinstance(content, list):
        content = _text_of_parts(content, where, role)
    calls = _tool_calls(tool_calls, where)
    if calls and role != "assistant":
        raise BadRecord(f"{where}: only assistant messages may have 'tool_calls'")
    # OpenAI writes content: null on a message that only calls tools; it stays null (chat_render tries "" too)
    if not (content is None and calls) and not isinstance(content, str):
        raise BadRecord(f"{where}: content must be a string, got {type(content).__name__}")
    if reasoning is not None and not isinstance(reasoning, str):
        raise BadRecord(f"{where}: reasoning_content must be a string, got {type(reasoning).__name__}")
    reasoning = reasoning if reasoning and reasoning.strip() else None
    # A thinking model's turn may be all reasoning: chat_render refuses it where the template drops reasoning
    if not (content or "").strip() and not calls and not may_be_empty and not (reasoning and role == "assistant"):
        raise BadRecord(f"{where}: empty content")
    message: dict[str, Any] = {"role": role, "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


def _text_of_parts(parts: list, where: str, role: str) -> str:
    """The text of OpenAI-style content parts [{"type": "text", "text": ...}, ...], joined with nothing between, as
    OpenAI reads them and as the templates that take parts (Mistral's, Kimi-K2's) print them; the Responses API's
    "input_text" and "output_text" parts and an assistant's "refusal" part are text too. Any other part is an image,
    a file or a sound, which a text model cannot read."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and role != "assistant":
            raise BadRecord(f"{where}: content part {j} is a refusal, which only an assistant message can hold")
        key = "refusal" if kind == "refusal" else "text"
        if not isinstance(part, dict) or "type" not in part:  # no part at all: structured data, a tool's JSON result
            shown = f"is a {type(part).__name__}" if not isinstance(part, dict) else "has no 'type'"
            raise BadRecord(f"{where}: content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} "
                            f"parts, and item {j} {shown}; write structured content (a tool's JSON result) as a string")
        if kind not in TEXT_PARTS:
            raise BadRecord(f"{where}: content part {j} has type {_short(kind)}: this trainer trains text models, which "
                            'read only {"type": "text", "text": ...} parts; remove the other parts, or write what they '
                            "hold as text")
        if not isinstance(part.get(key), str):
            raise BadRecord(f"{where}: content part {j}: {_short(key)} must be a string, got "
                            f"{type(part.get(key)).__name__}")
        texts.append(part[key])
    return "".join(texts)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    # Normalised to the transformers convention {"type": "function", "function": {"name", "arguments"}, "id"?},
    # which every chat template that supports tools reads; arguments as given: a JSON string or an object
    # (chat_render converts them to the form each template prints)
    if value is None or value == "" or value == []:
        return []
    value = _json_value(value, f"{where}: tool_calls")
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRecord(
                f"{where}: each tool call needs a 'name' string (or a 'function' object with one)"
            )
        args = fn.get("arguments", {})
        if not isinstance(_json_value(args, f"{where}: arguments of tool call {_short(fn['name'])}"), dict):
            raise BadRecord(f"{where}: arguments of tool call {_short(fn['name'])} must be a JSON object")
        normal = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            normal["id"] = call["id"]  # Mistral's templates check and print it
        out.append(normal)
    return out


def _tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    if value is None or value == "" or value == []:
        return None
    value = _json_value(value, where)
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRecord(f"{where} must be a list of tool schemas (objects)")
    return value


def _json_value(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    return loads(value, f"{where} (a JSON string)")  # MiniMind stores tools and tool calls as JSON strings


def _short(value: Any) -> str:
    """repr of a value from the data, cut so that one huge field cannot flood the error list."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_order(messages: list[dict[str, Any]], added: int = 0) -> None:
    # Templates disagree on everything else, but none can render these, and none should learn from them. A system
    # message between turns is left to the template: Qwen's and Llama's render it in place, Mistral's refuse it.
    # `added`: messages put before the data's own (a ShareGPT "system" field), which its numbering does not count
    for i, m in enumerate(messages):
        if m["role"] == "system" and i == added > 0:  # the data's first turn, after the "system" field's message
            raise BadRecord("message 0 is a system turn and the record has a 'system' field too: keep one of them")
        if m["role"] == "tool" and (
            i == 0 or not (messages[i - 1].get("tool_calls") or messages[i - 1]["role"] == "tool")
        ):
            raise BadRecord(f"message {i - added}: a tool message must follow an assistant tool call")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn: nothing to learn from this conversation")
    first = next(m["role"] for m in messages if m["role"] != "system")
    if first != "user":
        raise BadRecord(f"the first non-system message must be from the user, not the {first}")
