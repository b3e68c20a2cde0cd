"""The loss mask: decoded supervised spans must equal the assistant turns (+ end marker), exactly.

Checked for MiniMind's real tokenizer and template, Qwen3's real template (earlier turns lose their think
block), and templates written here in the styles of Llama-3, Gemma and Phi-3; for every record format.
"""

import copy
import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dataset.chat_render import common_prefix_len, render_conversation
from dataset.lm_dataset import SFTDataset
from dataset.records import BadRecord, read_conversations

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TOKENIZER = FIXTURES / "tokenizers" / "minimind"
QWEN3 = FIXTURES / "templates" / "qwen3.jinja"

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

GEMMA = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}{%- set role = "model" %}{%- else %}{%- set role = message['role'] %}{%- endif %}
    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"""

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 equals 4."}]
MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello, 你好.  \n"},  # Llama-3 and Gemma trim it, the others keep it
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
]
REASONING = [
    {"role": "system", "content": "Think first."},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_SCHEMA = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": {}},
}
TOOLS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the weather.", "tool_calls": [WEATHER]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER.is_dir():
        pytest.skip("../shared/fixtures is not available")
    return AutoTokenizer.from_pretrained(TOKENIZER)


def with_tokens(tok, tokens: list[str], **roles: str):
    """A copy of the tokenizer with extra special tokens (and bos/eos set), as another model family has."""
    tok = copy.deepcopy(tok)
    tok.add_tokens(tokens, special_tokens=True)
    for key, value in roles.items():
        setattr(tok, key, value)
    return tok


def spans(tok, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of supervised tokens."""
    runs, run = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def check(tok, messages, expected, template=None, tools=None):
    ids, mask = render_conversation(tok, messages, template, tools)
    # The ids are exactly what transformers' own chat rendering + tokenization gives
    text = tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False)
    assert ids == tok(text, add_special_tokens=False).input_ids
    assert spans(tok, ids, mask) == expected


# --- MiniMind's own tokenizer and template ----------------------------------------------------------------
def test_minimind_template(tok):
    # MiniMind's generation prompt already holds an empty think block, so only what follows it is learned
    check(tok, SINGLE, ["2+2 equals 4.<|im_end|>"])
    check(tok, MULTI, ["Hello, 你好.  \n<|im_end|>", "Blue.<|im_end|>"])
    # With reasoning the rendering departs from the generation prompt right after "<think>\n"
    check(tok, REASONING, ["R1\n</think>\n\nA1<|im_end|>", "R2\n</think>\n\nA2<|im_end|>"])
    check(
        tok,
        TOOLS,
        ["Need the weather.\n</think>\n\n" + CALL + "<|im_end|>", "It is 21 degrees.<|im_end|>"],
        tools=[TOOL_SCHEMA],
    )


# --- Qwen3's real template (no bos token) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3(tok):
    if not QWEN3.is_file():
        pytest.skip("../shared/fixtures/templates/qwen3.jinja is not available")
    return with_tokens(tok, [], bos_token=None), QWEN3.read_text()


def test_qwen3_template(qwen3):
    tok, template = qwen3
    assert tok.bos_token is None  # MiniMind's search for bos + "assistant\n" would find nothing here
    empty_think = "<think>\n\n</think>\n\n"
    check(tok, SINGLE, [empty_think + "2+2 equals 4.<|im_end|>"], template)
    # Turns before the last user message are rendered without any think block, later ones with it
    check(tok, MULTI, ["Hello, 你好.  \n<|im_end|>", empty_think + "Blue.<|im_end|>"], template)
    check(tok, REASONING, ["A1<|im_end|>", "<think>\nR2\n</think>\n\nA2<|im_end|>"], template)
    expected = [
        "<think>\nNeed the weather.\n</think>\n\n" + CALL + "<|im_end|>",
        empty_think + "It is 21 degrees.<|im_end|>",
    ]
    check(tok, TOOLS, expected, template, tools=[TOOL_SCHEMA])
    # Reasoning written inline in the content (MiniMind's R1 data) is split out by the template
    inline = [SINGLE[0], {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}]
    check(tok, inline, ["<think>\nR\n</think>\n\nA<|im_end|>"], template)


# --- Templates in the style of other families -------------------------------------------------------------
def test_llama3_style_template(tok):
    tok = with_tokens(
        tok,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos_token="<|begin_of_text|>",
    )
    check(tok, SINGLE, ["2+2 equals 4.<|eot_id|>"], LLAMA3)
    check(
        tok, MULTI, ["Hello, 你好.<|eot_id|>", "Blue.<|eot_id|>"], LLAMA3
    )  # content trimmed by the template


def test_gemma_style_template(tok):
    tok = with_tokens(tok, ["<bos>", "<start_of_turn>", "<end_of_turn>"], bos_token="<bos>")
    check(tok, SINGLE, ["2+2 equals 4.<end_of_turn>"], GEMMA)
    # No system role: the system text is folded into the first user turn, and not learned
    check(tok, MULTI, ["Hello, 你好.<end_of_turn>", "Blue.<end_of_turn>"], GEMMA)
    with pytest.raises(BadRecord, match="refused this conversation: Conversation roles must alternate"):
        render_conversation(tok, TOOLS, GEMMA)


def test_phi3_style_template(tok):
    tok = with_tokens(tok, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], eos_token="<|endoftext|>")
    # The eos that closes the whole conversation is not part of any turn
    check(tok, SINGLE, ["2+2 equals 4.<|end|>"], PHI3)
    check(tok, MULTI, ["Hello, 你好.  \n<|end|>", "Blue.<|end|>"], PHI3)
    # Leading spaces merge with the header's "\n" into one token ("\n "); a token that holds header text is
    # context (it is part of the prompt at inference), so learning starts at the next token
    check(tok, [SINGLE[0], {"role": "assistant", "content": "  Four."}], [" Four.<|end|>"], PHI3)


# --- Every record format gives the same messages and the same mask ----------------------------------------
FORMATS = {
    "minimind": {
        "conversations": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
        ]
    },
    "openai": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "reasoning_content": None},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
        ]
    },
    "sharegpt": {
        "system": "You are terse.",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Name a color."},
            {"from": "gpt", "value": "Blue."},
        ],
    },
    "alpaca": {
        "system": "You are terse.",
        "history": [["Hi", "Hello."]],
        "instruction": "Name a color.",
        "output": "Blue.",
    },
}
TOOL_FORMATS = {
    "minimind": {
        "conversations": [
            {"role": "system", "content": "Use tools.", "tools": json.dumps([TOOL_SCHEMA])},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ]
    },
    "openai": {
        "tools": [TOOL_SCHEMA],
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ],
    },
    "sharegpt": {
        "system": "Use tools.",
        "tools": json.dumps([TOOL_SCHEMA]),
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 degrees."},
        ],
    },
}


@pytest.mark.parametrize("formats", [FORMATS, TOOL_FORMATS], ids=["chat", "tools"])
def test_every_format_normalises_the_same(tok, tmp_path, formats):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in formats.values()), encoding="utf-8"
    )
    conversations, problems = read_conversations(path)
    assert problems == []
    first = conversations[0]
    for c in conversations[1:]:
        if formats is FORMATS:
            assert (c.messages, c.tools) == (first.messages, first.tools)
        else:  # tool-call arguments and ids stay as each format gives them; they render the same below
            assert [m["role"] for m in c.messages] == [m["role"] for m in first.messages]
            assert c.tools == first.tools
    ds = SFTDataset(path, tok, max_length=512, log=None)
    assert len(ds) == len(formats)
    expected = (
        ["Hello.<|im_end|>", "Blue.<|im_end|>"]
        if formats is FORMATS
        else [CALL + "<|im_end|>", "It is 21 degrees.<|im_end|>"]
    )
    for i in range(len(ds)):
        input_ids, labels = ds[i]
        assert input_ids.tolist() == ds[0][0].tolist()
        supervised = (labels != -100).int().tolist()
        assert (labels[labels != -100] == input_ids[labels != -100]).all()  # labels are the ids, not shifted
        assert spans(tok, input_ids.tolist(), supervised) == expected


def test_common_prefix_len():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        naive = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix_len(a, b) == naive


def test_an_empty_system_message_is_rendered_as_given(tok, tmp_path):
    # MiniMind's tool data: the system message only carries the tools, its content is empty
    record = copy.deepcopy(TOOL_FORMATS["minimind"])
    record["conversations"][0]["content"] = ""
    path = tmp_path / "tools.jsonl"
    plain = [{"role": "system", "content": ""}] + FORMATS["minimind"]["conversations"][1:]
    sharegpt = {"system": "", "conversations": [{"from": "system", "value": ""}] + [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in plain[1:]]}
    path.write_text("\n".join(json.dumps(r) for r in (record, {"conversations": plain}, {"messages": plain}, sharegpt))
                    + "\n")
    conversations, problems = read_conversations(path)
    assert problems == []
    # Without tools too: exported data often carries an empty system prompt, which keeps out a template's default
    for c in conversations[1:]:
        assert c.messages[0] == {"role": "system", "content": ""} and c.tools is None
        assert [m["role"] for m in c.messages] == [m["role"] for m in plain]  # ShareGPT's empty field: none
        ids, mask = render_conversation(tok, c.messages)
        assert tok.decode(ids).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
        assert spans(tok, ids, mask) == ["Hello.<|im_end|>", "Blue.<|im_end|>"]
    assert conversations[0].messages[0] == {"role": "system", "content": ""}
    assert conversations[0].tools == [TOOL_SCHEMA]
    ids, mask = render_conversation(tok, conversations[0].messages, tools=conversations[0].tools)
    assert spans(tok, ids, mask) == [CALL + "<|im_end|>", "It is 21 degrees.<|im_end|>"]
    assert tok.decode(ids).startswith("<|im_start|>system\n\n\n# Tools")
