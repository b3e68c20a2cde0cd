"""Masks for real public chat templates (../shared/fixtures/templates): decoded supervised spans, exactly.

Each template is paired with MiniMind's tokenizer plus the template's special tokens (as the fixtures'
README says). Every span is the assistant's text as the template renders it, through its end-of-turn
marker: the generation prompt is context; what the template writes after it (think blocks, `>>>all\\n`,
`<|START_RESPONSE|>`, `[TOOL_CALLS]`) is learned. The expected strings are written out from the templates.
"""

import copy
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import _compile_jinja_template

from dataset.chat_render import TemplateError, load_chat_format, render_conversation
from dataset.lm_dataset import SFTDataset
from dataset.records import BadRecord, DataError, parse_conversation
from tests.test_dataset_masks import spans, with_tokens

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TEMPLATES = FIXTURES / "templates"
LLAMA = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
MISTRAL = ["<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
           "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[ARGS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[IMG]"]
DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>",
            "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>"]
COHERE = ["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
          "<|CHATBOT_TOKEN|>", "<|START_THINKING|>", "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>",
          "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"]
KIMI = ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
# template -> (special tokens it adds to MiniMind's, bos/eos of its model)
MODELS = {
    "qwen3": ([], {"bos_token": None}),
    "qwen25": ([], {"bos_token": None}),
    "deepseek_r1_distill_qwen": (DEEPSEEK, {"bos_token": DEEPSEEK[0], "eos_token": DEEPSEEK[1]}),
    "llama31": (LLAMA, {"bos_token": LLAMA[0], "eos_token": "<|eot_id|>"}),
    "mistral_small32": (MISTRAL + ["[CALL_ID]", "[TOOL_CONTENT]"], {"bos_token": "<s>", "eos_token": "</s>"}),
    "devstral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}),
    "command_r7b_tools": (COHERE, {"bos_token": COHERE[0], "eos_token": "<|END_OF_TURN_TOKEN|>"}),
    "hermes2pro_tools": ([LLAMA[0]], {"bos_token": LLAMA[0]}),
    "kimi_k2": (KIMI, {"bos_token": None}),
    "functionary_v32": (LLAMA, {"bos_token": LLAMA[0], "eos_token": "<|eot_id|>"}),
}

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 equals 4."}]
MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！{ } % done\n\nok"},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
]
# Replies that begin with the characters a generation prompt ends with (`<think>\n`, `>>>`, `[/INST]`...)
ANGLE = [
    {"role": "user", "content": "Bold five?"},
    {"role": "assistant", "content": "<b>5</b>"},
    {"role": "user", "content": "Tag it."},
    {"role": "assistant", "content": "<tool_call>\nx\n</tool_call>"},
]
REASONING = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
]
SCHEMA = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}


def tool_chat(arguments, content) -> list[dict]:
    """Tool call -> tool result -> answer, with arguments and empty content in the form the data gives."""
    call = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]


OBJECT_ARGS, STRING_ARGS = {"city": "Paris"}, '{"city": "Paris"}'
# What each template learns. Most end every turn with one token; Command-R ends a reply with two.
IM, EOT, EOS_M, EOS_D = "<|im_end|>", "<|eot_id|>", "</s>", "<｜end▁of▁sentence｜>"
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
EMPTY_THINK = "<think>\n\n</think>\n\n"


def plain(end: str, before: str = "", last: str = "") -> dict[str, list[str]]:
    """Spans of the plain chats for a template that writes `before` ahead of every reply (`last` ahead of
    the conversation's last reply) and ends turns with `end`."""
    last = last or before
    return {
        "single": [last + "2+2 equals 4." + end],
        "multi": [before + "你好！{ } % done\n\nok" + end, last + "Blue." + end],
        "angle": [before + "<b>5</b>" + end, last + "<tool_call>\nx\n</tool_call>" + end],
        "reasoning": [before + "A1" + end, last + "A2" + end],  # reasoning not rendered: not learned
    }


COHERE_REPLY = ("<|START_RESPONSE|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>")
EXPECTED = {
    "qwen3": {
        **plain(IM, last=EMPTY_THINK),
        # Qwen3 renders reasoning only after the last user message
        "reasoning": ["A1" + IM, "<think>\nR2\n</think>\n\nA2" + IM],
        "tools": [QWEN_CALL + IM, EMPTY_THINK + "It is 21 degrees." + IM],
    },
    "qwen25": {**plain(IM), "tools": [QWEN_CALL + IM, "It is 21 degrees." + IM]},
    "hermes2pro_tools": {**plain(IM), "tools": [QWEN_CALL + IM, "It is 21 degrees." + IM]},
    "deepseek_r1_distill_qwen": {
        **plain(EOS_D),  # the template strips reasoning from every turn
        "tools": [
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Paris"}\n```<｜tool▁call▁end｜>',  # the template closes one call no further
            "It is 21 degrees." + EOS_D,
        ],
    },
    "llama31": {
        **plain(EOT),
        "tools": ['{"name": "get_weather", "parameters": {"city": "Paris"}}' + EOT, "It is 21 degrees." + EOT],
    },
    "functionary_v32": {
        **plain(EOT, before="all\n"),  # the generation prompt ends ">>>": the model names the recipient
        "tools": ['get_weather\n{"city": "Paris"}' + EOT, "all\nIt is 21 degrees." + EOT],
    },
    "mistral_small32": {
        **plain(EOS_M),
        "tools": ['[TOOL_CALLS]get_weather[CALL_ID]call00001[ARGS]{"city": "Paris"}' + EOS_M,
                  "It is 21 degrees." + EOS_M],
    },
    "devstral": {
        **plain(EOS_M),
        "tools": ['[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}' + EOS_M, "It is 21 degrees." + EOS_M],
    },
    "command_r7b_tools": {
        **{k: [COHERE_REPLY[0] + s[: -len(EOS_M)] + COHERE_REPLY[1] for s in v] for k, v in plain(EOS_M).items()},
        "tools": [
            '<|START_THINKING|><|END_THINKING|><|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": '
            '"get_weather", "parameters": {"city": "Paris"}}\n]<|END_ACTION|><|END_OF_TURN_TOKEN|>',
            COHERE_REPLY[0] + "It is 21 degrees." + COHERE_REPLY[1],
        ],
    },
    "kimi_k2": {
        **plain(IM),
        "tools": [
            "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>' + IM,
            "It is 21 degrees." + IM,
        ],
    },
}
# The form of a tool call each template can render: DeepSeek and Functionary concatenate the arguments as
# text, so they need OpenAI's JSON string (content null); the others print an object.
TOOL_CHATS = {name: tool_chat(OBJECT_ARGS, "") for name in MODELS}
TOOL_CHATS["deepseek_r1_distill_qwen"] = tool_chat(STRING_ARGS, None)
TOOL_CHATS["functionary_v32"] = tool_chat(STRING_ARGS, "")


@pytest.fixture(scope="module")
def minimind():
    if not (FIXTURES / "tokenizers" / "minimind").is_dir() or not TEMPLATES.is_dir():
        pytest.skip("../shared/fixtures is not available")
    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "minimind")


def model_tokenizer(minimind, name: str):
    """MiniMind's tokenizer with the template's special tokens and its model's bos/eos."""
    tokens, roles = MODELS[name]
    return with_tokens(minimind, tokens, **roles)


def rendered_ids(tok, template: str, messages: list[dict], tools) -> list[list[int]]:
    """The tokens of the conversation as the template itself renders it (transformers' own environment), for
    each way of writing an empty content (null or "") and no tools (None or []) that the template accepts."""
    out = []
    for content in ("", None):
        for no_tools in (None, []):
            chat = [{**m, "content": content} if m.get("tool_calls") and not m["content"] else m for m in messages]
            try:
                text = _compile_jinja_template(template).render(
                    messages=chat, tools=tools or no_tools, add_generation_prompt=False, **tok.special_tokens_map
                )
            except Exception:  # this form is one the template cannot render
                continue
            out.append(tok(text, add_special_tokens=False).input_ids)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_template_masks(minimind, name):
    tok, template = model_tokenizer(minimind, name), (TEMPLATES / f"{name}.jinja").read_text()
    chats = {"single": SINGLE, "multi": MULTI, "angle": ANGLE, "reasoning": REASONING, "tools": TOOL_CHATS[name]}
    for kind, messages in chats.items():
        tools = [SCHEMA] if kind == "tools" else None
        ids, mask = render_conversation(tok, messages, template, tools)
        assert spans(tok, ids, mask) == EXPECTED[name][kind], kind
        # The ids are the template's own rendering, tokenized once (empty content as the template needs it)
        assert ids in rendered_ids(tok, template, messages, tools), kind


@pytest.mark.parametrize("name", ["minimind", *sorted(MODELS)])
def test_a_system_message_between_turns_is_placed_by_the_template(minimind, name):
    # An instruction that changes mid-chat: the ids are the template's own rendering (in place for Qwen's and Llama's,
    # moved to the front by DeepSeek's) and the loss learns the assistant turns as without that message; a template
    # that refuses it (Mistral-Small's alternation check) makes it one bad record
    tok = minimind if name == "minimind" else model_tokenizer(minimind, name)
    template = None if name == "minimind" else (TEMPLATES / f"{name}.jinja").read_text()
    mid = [*MULTI[:3], {"role": "system", "content": "Answer in French from now on."}, *MULTI[3:]]
    messages, _ = parse_conversation({"messages": mid})
    if name == "mistral_small32":
        with pytest.raises(BadRecord, match="the chat template refused this conversation"):
            render_conversation(tok, messages, template)
        return
    ids, mask = render_conversation(tok, messages, template)
    assert ids in rendered_ids(tok, template or tok.chat_template, mid, None)
    assert "French" in tok.decode(ids)
    assert spans(tok, ids, mask) == spans(tok, *render_conversation(tok, MULTI, template))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tool_call_arguments_are_learned_as_the_template_prints_them(minimind, name):
    # OpenAI's format writes arguments as a JSON string, transformers' as an object. Templates that JSON-encode
    # them (Qwen2.5, Llama 3.1, Mistral, Kimi, Command-R) would quote a string a second time, and templates that
    # join them to text (DeepSeek, Functionary) cannot take an object: either form of the data is learned as the
    # template prints an object (EXPECTED), and the ids are the template's own rendering of that form.
    tok, template = model_tokenizer(minimind, name), (TEMPLATES / f"{name}.jinja").read_text()
    fixed_form = TOOL_CHATS[name][1]["tool_calls"][0]["function"]["arguments"]
    for arguments in (OBJECT_ARGS, STRING_ARGS):
        for content in ("", None):
            ids, mask = render_conversation(tok, tool_chat(arguments, content), template, [SCHEMA])
            assert spans(tok, ids, mask)[0] == EXPECTED[name]["tools"][0], (arguments, content)
            assert ids in rendered_ids(tok, template, tool_chat(fixed_form, content), [SCHEMA])


def test_arguments_given_in_another_spacing_keep_it_where_the_template_takes_either_form(minimind):
    # Qwen3 prints a string as it is and encodes an object: the data's own text of the arguments is learned
    tok = model_tokenizer(minimind, "qwen3")
    template = (TEMPLATES / "qwen3.jinja").read_text()
    ids, mask = render_conversation(tok, tool_chat('{"city":"Paris"}', ""), template, [SCHEMA])
    assert '"arguments": {"city":"Paris"}}' in spans(tok, ids, mask)[0]


def test_a_conversation_the_template_refuses_is_named_by_file_and_line(minimind, tmp_path):
    tok = model_tokenizer(minimind, "llama31")
    two_calls = copy.deepcopy(tool_chat(OBJECT_ARGS, ""))
    two_calls[1]["tool_calls"] *= 2
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": SINGLE}) + "\n" + json.dumps({"messages": two_calls, "tools": [SCHEMA]})
                    + "\n")
    template = (TEMPLATES / "llama31.jinja").read_text()
    with pytest.raises(DataError) as err:
        SFTDataset(path, tok, 256, chat_template=template, num_workers=1, log=None)
    assert (f"{path}:2: the chat template refused this conversation: This model only supports single tool-calls"
            in str(err.value))
    assert len(SFTDataset(path, tok, 256, skip_invalid=True, chat_template=template, num_workers=1, log=None)) == 1


def test_template_that_renders_only_with_tools(minimind):
    # Hermes-2-Pro iterates over `tools` unconditionally: it is given an empty list when the data has none
    tok = model_tokenizer(minimind, "hermes2pro_tools")
    fmt = load_chat_format(tok, (TEMPLATES / "hermes2pro_tools.jinja").read_text())
    assert fmt.no_tools == [] and not fmt.needs_tools
    needs_tools = "{% for t in tools %}{% endfor %}{% if not tools %}{{ raise_exception('no tools') }}{% endif %}"
    template = needs_tools + (TEMPLATES / "qwen25.jinja").read_text()
    fmt = load_chat_format(tok, template)
    assert fmt.needs_tools
    ids, mask = render_conversation(tok, SINGLE, template, [SCHEMA])
    assert spans(tok, ids, mask) == ["2+2 equals 4.<|im_end|>"]
    with pytest.raises(BadRecord, match="renders only conversations that offer tools"):
        render_conversation(tok, SINGLE, template)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{% for m in messages %}{{ m.content }}", "does not compile: TemplateSyntaxError"),
        ("{{ raise_exception('only tool use') }}", "cannot render a plain user/assistant exchange: only tool use"),
        ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}<|im_end|>{% endif %}{% endfor %}",
         "does not render the assistant's content"),
        ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}",
         "cannot be masked: assistant message 1: the chat template writes no special token after it ('\\n'), "
         "so the model could not learn to stop"),
    ],
    ids=["syntax", "raises", "no-reply", "no-end-token"],
)
def test_a_template_that_cannot_be_masked_gets_one_line(minimind, template, problem):
    with pytest.raises(TemplateError) as err:
        load_chat_format(minimind, template)
    message = str(err.value)
    assert message.startswith("the chat template given (--chat_template) ") and problem in message
    assert "\n" not in message
    with pytest.raises(TemplateError, match="^chat.jinja " + re.escape(problem)):  # as the trainer can name it
        SFTDataset(Path("unused.jsonl"), minimind, 64, chat_template=template, template_name="chat.jinja", log=None)


def test_a_template_file_with_a_byte_order_mark_renders_as_the_plain_file(minimind, tmp_path):
    # Windows Notepad's "UTF-8 with BOM": the mark is no part of the template, so no part of every chat
    from trainer.args import check_template_file

    text = (TEMPLATES / "qwen25.jinja").read_text(encoding="utf-8")
    (tmp_path / "bom.jinja").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert check_template_file(tmp_path / "bom.jinja") == text
    ids, _ = render_conversation(minimind, SINGLE, check_template_file(tmp_path / "bom.jinja"))
    assert minimind.decode(ids).startswith("<|im_start|>system\nYou are Qwen")


@pytest.mark.parametrize("script", [False, True])
def test_a_folder_given_as_template_says_a_jinja_file_is_wanted(minimind, tmp_path, script):
    # A model folder is the natural mistake: its template comes with --tokenizer_path, not --chat_template
    from model.errors import UserError
    from trainer.args import check_template_file
    from trainer.base_flags import use_chat_template

    minimind.save_pretrained(tmp_path / "model")
    with pytest.raises(UserError) as err:
        use_chat_template(copy.deepcopy(minimind), str(tmp_path / "model"), None) if script else \
            check_template_file(tmp_path / "model")
    assert str(err.value) == (f"--chat_template {tmp_path / 'model'}: a folder, not a .jinja file; a model folder's "
                              f"own template comes with --tokenizer_path {tmp_path / 'model'}")


def test_a_template_for_another_tokenizer_says_which_tokenizer_to_pass(minimind):
    # Llama-3.1's <|eot_id|> is plain text to MiniMind's tokenizer: the one line says what to change
    with pytest.raises(TemplateError) as err:
        load_chat_format(minimind, (TEMPLATES / "llama31.jinja").read_text(), "llama31.jinja")
    assert str(err.value) == (
        "llama31.jinja cannot be masked: assistant message 1: the chat template writes no special token after it "
        "('<|eot_id|>'), so the model could not learn to stop; a template made for another model marks turns with "
        "that model's special tokens: pass its tokenizer with --tokenizer_path")


def two_call_turns(first_content, second_content) -> list[dict]:
    """Two tool-call turns in one conversation, each with its own form of empty content."""
    second = copy.deepcopy(tool_chat(OBJECT_ARGS, second_content))
    second[1]["tool_calls"][0]["id"] = second[2]["tool_call_id"] = "call00002"
    return tool_chat(OBJECT_ARGS, first_content) + second


@pytest.mark.parametrize("name", ["deepseek_r1_distill_qwen", "devstral", "qwen3", "mistral_small32"])
def test_a_record_mixing_null_and_empty_content_in_its_tool_calls_renders_as_either_uniform_form(
        minimind, tmp_path, name):
    # DeepSeek renders calls only with content null, Devstral indexes content[0] of a null one: a record that
    # writes "" in one tool-call turn and null in another renders as the form the template takes throughout
    tok, template = model_tokenizer(minimind, name), (TEMPLATES / f"{name}.jinja").read_text()
    uniform = []
    for content in (None, ""):
        try:
            uniform.append(render_conversation(tok, two_call_turns(content, content), template, [SCHEMA]))
        except BadRecord:
            continue
    assert uniform
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": two_call_turns(*forms), "tools": [SCHEMA]}) + "\n"
                            for forms in (("", None), (None, ""))))
    ds = SFTDataset(path, tok, 4096, chat_template=template, num_workers=1, log=None)
    assert len(ds) == 2
    for i in range(len(ds)):
        ids, labels = ds[i]
        assert (ids.tolist(), (labels != -100).int().tolist()) in uniform


def test_turns_whose_history_renders_differently(minimind):
    # Qwen3 drops the think block of a tool call once a later user message exists, and Mistral moves the
    # tools to the last user message: each turn is learned as the full conversation renders it
    chat = tool_chat(OBJECT_ARGS, "")
    chat[1] = {**chat[1], "reasoning_content": "Need the weather."}
    chat += [{"role": "user", "content": "And tomorrow?"}, {"role": "assistant", "content": "Same."}]
    expected = {
        "qwen3": [QWEN_CALL + IM, "It is 21 degrees." + IM, EMPTY_THINK + "Same." + IM],
        "mistral_small32": [
            '[TOOL_CALLS]get_weather[CALL_ID]call00001[ARGS]{"city": "Paris"}' + EOS_M,
            "It is 21 degrees." + EOS_M,
            "Same." + EOS_M,
        ],
    }
    for name, runs in expected.items():
        tok, template = model_tokenizer(minimind, name), (TEMPLATES / f"{name}.jinja").read_text()
        ids, mask = render_conversation(tok, chat, template, [SCHEMA])
        assert spans(tok, ids, mask) == runs, name
        assert ids in rendered_ids(tok, template, chat, [SCHEMA]), name


# A template in the style of the harmony format (gpt-oss): three end markers, none of them the user's alone
HARMONY = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'assistant' and m.tool_calls -%}<|start|>assistant to=functions."
    "{{ m.tool_calls[0].function.name }}<|channel|>commentary json<|message|>"
    "{{ m.tool_calls[0].function.arguments | tojson }}<|call|>"
    "{%- elif m.role == 'assistant' -%}<|start|>assistant<|channel|>final<|message|>{{ m.content }}"
    "{%- if loop.last %}<|return|>{% else %}<|end|>{% endif -%}"
    "{%- elif m.role == 'tool' -%}<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
    "{{ m.content }}<|end|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def test_several_end_of_turn_markers(minimind):
    tok = copy.deepcopy(minimind)
    tok.add_tokens(["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"], special_tokens=True)
    tok.eos_token = "<|return|>"
    chat = tool_chat(OBJECT_ARGS, "") + [{"role": "user", "content": "And tomorrow?"}, {"role": "assistant", "content": "Same."}]
    ids, mask = render_conversation(tok, chat, HARMONY, [SCHEMA])
    assert spans(tok, ids, mask) == [
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        "<|channel|>final<|message|>It is 21 degrees.<|end|>",
        "<|channel|>final<|message|>Same.<|return|>",
    ]
    # Arguments with no string value: the end is still found after them, not after the name in the header
    ids, mask = render_conversation(tok, tool_chat({"days": 3}, ""), HARMONY, [SCHEMA])
    assert spans(tok, ids, mask)[0] == ' to=functions.get_weather<|channel|>commentary json<|message|>{"days": 3}<|call|>'


def test_a_template_without_tool_support_does_not_drop_calls_silently(minimind):
    chat = tool_chat(OBJECT_ARGS, "Let me check.")
    with pytest.raises(BadRecord, match="cannot render this conversation's tool calls: it does not render the tool "
                                        "calls of assistant message 1"):
        render_conversation(minimind, chat, (TEMPLATES / "qwen25.jinja").read_text().replace("tool_calls", "x"))


# Mistral v0.3 / Nemo style: the system prompt goes into the last user message, wherever the chat ends
SYSTEM_LAST = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if (loop_messages|length - loop.index0) <= 2 and system_message is defined %}"
    "{{- '[INST]' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def test_system_prompt_moved_to_the_last_user_message(minimind):
    tok = copy.deepcopy(minimind)
    tok.add_tokens(["<s>", "</s>", "[INST]", "[/INST]"], special_tokens=True)
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    ids, mask = render_conversation(tok, MULTI, SYSTEM_LAST)
    assert tok.decode(ids).startswith("<s>[INST]你好[/INST]你好！")  # the system prompt is not in the first turn
    assert spans(tok, ids, mask) == ["你好！{ } % done\n\nok</s>", "Blue.</s>"]


def test_tools_a_template_does_not_render_are_noted_in_the_data_line(minimind, tmp_path):
    # DeepSeek-R1-Distill's template renders the calls but never the schemas: the model would learn calls to tools
    # it was never shown, so the data line says how many samples that is (also when the tokens come from the cache)
    from dataset.token_cache import TokenCache

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": tool_chat(STRING_ARGS, None), "tools": [SCHEMA]}) + "\n"
                    + json.dumps({"messages": SINGLE}) + "\n")
    cache = TokenCache(tmp_path / "cache")
    for name, noted in (("deepseek_r1_distill_qwen", True), ("qwen25", False)):
        template = (TEMPLATES / f"{name}.jinja").read_text()
        for _ in ("tokenized", "read from the cache"):
            ds = SFTDataset(path, model_tokenizer(minimind, name), 256, chat_template=template, cache=cache, log=None)
            assert len(ds) == 2
            assert ("\n  note: 1 sample(s) offer tools whose schemas the chat template does not render" in ds.summary
                    ) is noted, (name, ds.summary)
        assert "read from the cache" in ds.summary


def test_reasoning_a_template_does_not_render_is_noted_in_the_data_line(minimind, tmp_path):
    # As unrendered tool schemas are: the model learns the replies without the reasoning the data has for them
    from dataset.token_cache import TokenCache

    path = tmp_path / "reasoning.jsonl"
    path.write_text(json.dumps({"messages": REASONING}) + "\n" + json.dumps({"messages": SINGLE}) + "\n")
    cache = TokenCache(tmp_path / "cache")
    note = "\n  note: 1 sample(s) have reasoning_content that the chat template does not render"
    for name, noted in (("qwen25", True), ("llama31", True), ("deepseek_r1_distill_qwen", True), ("qwen3", False)):
        template = (TEMPLATES / f"{name}.jinja").read_text()
        for _ in ("tokenized", "read from the cache"):
            ds = SFTDataset(path, model_tokenizer(minimind, name), 256, chat_template=template, cache=cache,
                            log=None)
            assert ds.summary.count("note:") == noted and (note in ds.summary) is noted, (name, ds.summary)
        assert "read from the cache" in ds.summary


REASONING_ONLY = {  # a thinking model's turn with nothing but reasoning, in both ways data writes it
    "field": {"role": "assistant", "content": "", "reasoning_content": "R1"},
    "think block": {"role": "assistant", "content": "<think>R1</think>"},
}
NOTHING_TO_LEARN = "assistant message 1: nothing to learn: the chat template renders it empty"


@pytest.mark.parametrize(("name", "learned"), [
    ("qwen3", {"field": "<think>\nR1\n</think>\n\n<|im_end|>", "think block": "<think>\nR1\n</think>\n\n<|im_end|>"}),
    ("deepseek_r1_distill_qwen", {}),  # the template strips reasoning from every turn
    ("qwen25", {"think block": "<think>R1</think><|im_end|>"}),  # no reasoning: a think block is text of the reply
])
def test_a_reasoning_only_turn_is_learned_where_the_template_renders_it(minimind, tmp_path, name, learned):
    # Where the template renders the reasoning it is the turn's text; where it drops it, the turn renders empty and
    # would teach the model to answer nothing, so the line is refused by file:line
    tok, template = model_tokenizer(minimind, name), (TEMPLATES / f"{name}.jinja").read_text()
    for form, turn in REASONING_ONLY.items():
        last = [SINGLE[0], turn]
        earlier = last + [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
        path = tmp_path / f"{name}-{form}.jsonl"
        path.write_text(json.dumps({"messages": last}) + "\n" + json.dumps({"messages": earlier}) + "\n")
        if form in learned:
            assert spans(tok, *render_conversation(tok, last, template)) == [learned[form]]
            bad = [2] if name == "qwen3" else []  # Qwen3 drops the reasoning of turns before the last user message
        else:
            bad = [1, 2]
        if not bad:
            assert len(SFTDataset(path, tok, 256, chat_template=template, log=None, num_workers=1)) == 2
            continue
        with pytest.raises(DataError) as err:
            SFTDataset(path, tok, 256, chat_template=template, log=None, num_workers=1)
        assert [f"{path}:{line}: {NOTHING_TO_LEARN}" in str(err.value) for line in (1, 2)] == [
            line in bad for line in (1, 2)], (form, str(err.value))


def test_huge_arguments_given_as_a_string_are_cut_after_their_conversion(minimind, tmp_path):
    # A long line is cut a safe number of characters past max_length; a JSON string cut first would not parse
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": tool_chat(json.dumps({"city": "P" * 200_000}), ""), "tools": [SCHEMA]})
                    + "\n")
    for name in ("qwen25", "functionary_v32"):
        ds = SFTDataset(path, model_tokenizer(minimind, name), 1024, log=None, num_workers=1,
                        chat_template=(TEMPLATES / f"{name}.jinja").read_text())
        assert len(ds) == 1 and len(ds[0][0]) == 1024


def as_parts(messages: list[dict], rng: random.Random) -> list[dict]:
    """The messages with every string content written as OpenAI-style text parts, cut at random places; each part
    of the Chat Completions type ("text") or the Responses API's ("input_text", an assistant's "output_text")."""
    out = []
    for m in messages:
        text = m["content"]
        if isinstance(text, str):
            cuts = sorted(rng.sample(range(len(text) + 1), min(2, len(text) + 1)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            kinds = ["text", "output_text" if m["role"] == "assistant" else "input_text"]
            m = {**m, "content": [{"type": rng.choice(kinds), "text": piece} for piece in pieces if piece]}
        out.append(m)
    return out


@pytest.mark.parametrize("name", ["minimind", *sorted(MODELS)])
def test_content_parts_give_the_ids_and_masks_of_plain_strings(minimind, tmp_path, name):
    # The same file written with text parts for every role (system, user, assistant, tool) trains on exactly
    # the tokens and loss mask of the plain file, through the real tokenizer and template
    tok = minimind if name == "minimind" else model_tokenizer(minimind, name)
    template = None if name == "minimind" else (TEMPLATES / f"{name}.jinja").read_text()
    chats = [(SINGLE, None), (MULTI, None), (ANGLE, None), (REASONING, None),
             (TOOL_CHATS.get(name, tool_chat(OBJECT_ARGS, "")), [SCHEMA])]
    rng = random.Random(0)
    datasets = []
    for kind, write in (("plain", lambda m: m), ("parts", lambda m: as_parts(m, rng))):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"messages": write(m), **({"tools": t} if t else {})}) + "\n"
                                for m, t in chats))
        datasets.append(SFTDataset(path, tok, 4096, chat_template=template, num_workers=1, log=None))
    plain, parts = datasets
    assert len(plain) == len(chats)
    for a, b in ((plain.ids, parts.ids), (plain.mask, parts.mask), (plain.lengths, parts.lengths)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["mistral_small32", "devstral", "kimi_k2"])
def test_content_parts_read_as_the_templates_that_take_parts_print_them(minimind, name):
    # Mistral's and Kimi-K2's templates print a list of text parts back to back: records.py joins them the same
    # way, so these templates give the same tokens from the parts as from the joined string
    tok, template = model_tokenizer(minimind, name), (TEMPLATES / f"{name}.jinja").read_text()
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": " 2+2?\n"},
                                          {"type": "text", "text": "Be brief."}]},
             {"role": "assistant", "content": "4."}]
    messages, _ = parse_conversation({"messages": parts})
    ids, _ = render_conversation(tok, messages, template)
    assert ids in rendered_ids(tok, template, parts, None)


def own_prompt_tokens(tok, template: str, header: str) -> int:
    """The tokens the template writes between bos and the first user turn's `header`, from its own rendering."""
    text = tok.apply_chat_template(SINGLE, chat_template=template, tokenize=False)
    own = text.removeprefix(tok.bos_token or "")[: text.removeprefix(tok.bos_token or "").index(header)]
    return len(tok(own, add_special_tokens=False).input_ids)


def write_chats(path: Path, chats: list[list[dict]], system: str | None = None) -> Path:
    with_system = [[{"role": "system", "content": system}] if system else [] for _ in chats]
    path.write_text("".join(json.dumps({"messages": s + c, "tools": [SCHEMA] if any(m.get("tool_calls") for m in c)
                                        else None}) + "\n" for s, c in zip(with_system, chats)))
    return path


def test_a_default_system_prompt_that_fills_the_row_is_named_with_its_fix(minimind, tmp_path):
    # Devstral's template writes a long system prompt of its own into every conversation without one
    tok, template = model_tokenizer(minimind, "devstral"), (TEMPLATES / "devstral.jinja").read_text()
    n = own_prompt_tokens(tok, template, "[INST]")
    assert n > 512
    path = write_chats(tmp_path / "tools.jsonl", [TOOL_CHATS["devstral"]] * 6)
    with pytest.raises(DataError) as err:
        SFTDataset(path, tok, 512, chat_template=template, log=None)
    assert str(err.value) == (
        f"{path}: no usable samples (0 invalid lines skipped, 6 with nothing to learn after truncation); the chat "
        f"template writes its own system prompt of {n} tokens before the first user message of a conversation "
        "without a system message, which leaves 6 sample(s) nothing to learn in a row of 512 tokens (--max_seq_len): "
        f"pass a --max_seq_len that holds those {n} tokens and the conversation, or give them a system message of "
        "their own (the template writes it instead)")
    # Both fixes it names keep every sample
    own = SFTDataset(write_chats(tmp_path / "own.jsonl", [TOOL_CHATS["devstral"]] * 6, "You call tools."), tok, 512,
                     chat_template=template, log=None)
    longer = SFTDataset(path, tok, n + 512, chat_template=template, log=None)
    assert len(own) == len(longer) == 6 and own.dropped == longer.dropped == 0
    assert "note:" not in own.summary + longer.summary


def test_samples_the_default_system_prompt_crowds_out_are_noted_under_the_data_line(minimind, tmp_path):
    # The prompt fits in the row, and plain chats after it, but not the tool schemas and calls of the tool chats
    from dataset.token_cache import TokenCache

    tok, template = model_tokenizer(minimind, "devstral"), (TEMPLATES / "devstral.jinja").read_text()
    n = own_prompt_tokens(tok, template, "[INST]")
    path = write_chats(tmp_path / "mix.jsonl", [TOOL_CHATS["devstral"]] * 3 + [SINGLE] * 2)
    note = (f"\n  note: the chat template writes its own system prompt of {n} tokens before the first user message "
            f"of a conversation without a system message, which leaves 3 sample(s) nothing to learn in a row of "
            f"{n + 40} tokens (--max_seq_len): pass a larger --max_seq_len, or give them a system message of their "
            "own (the template writes it instead)")
    cache = TokenCache(tmp_path / "cache")
    for how in ("tokens cached in", "tokens read from the cache"):
        ds = SFTDataset(path, tok, n + 40, chat_template=template, cache=cache, log=None)
        assert (len(ds), ds.dropped) == (2, 3) and how in ds.summary
        assert ds.summary.endswith(note), ds.summary
    assert len(SFTDataset(path, tok, n + 512, chat_template=template, log=None)) == 5


def test_a_prompt_a_system_message_does_not_replace_is_named_with_the_one_fix(minimind, tmp_path):
    # Llama-3.1 writes its date lines whether or not the data has a system message: only a longer row helps
    tok, template = model_tokenizer(minimind, "llama31"), (TEMPLATES / "llama31.jinja").read_text()
    n = own_prompt_tokens(tok, template, "<|start_header_id|>user")
    for system in (None, "Be brief."):
        path = write_chats(tmp_path / "single.jsonl", [SINGLE] * 2, system)
        with pytest.raises(DataError) as err:
            SFTDataset(path, tok, n + 3, chat_template=template, log=None)
        assert str(err.value).endswith(
            f"the chat template writes its own system prompt of {n} tokens before the first user message of every "
            f"conversation, which leaves 2 sample(s) nothing to learn in a row of {n + 3} tokens (--max_seq_len): "
            "pass a larger --max_seq_len"), str(err.value)
    # A template with no prompt of its own: truncation alone, as before
    path = write_chats(tmp_path / "single.jsonl", [SINGLE] * 2)
    with pytest.raises(DataError, match="; a larger --max_seq_len keeps the answers that truncation cut off$"):
        SFTDataset(path, model_tokenizer(minimind, "qwen3"), 6, chat_template=(TEMPLATES / "qwen3.jinja").read_text(),
                   log=None)


def test_a_default_system_prompt_that_fills_the_row_with_the_real_cli(tmp_path):
    # The demo base's tokenizer with Devstral's template (--chat_template) at the default --max_seq_len 512
    from tests.train_utils import REPO, lora_args, python, run_cli, save_tiny_minimind, subprocess_env

    if not TEMPLATES.is_dir():
        pytest.skip("../shared/fixtures is not available")
    weight = save_tiny_minimind(tmp_path / "base.pth")
    chats = [TOOL_CHATS["devstral"]] * 4
    for system, status in ((None, 2), ("You call tools.", 0)):
        path = write_chats(tmp_path / "tools.jsonl", chats, system)
        run = run_cli([python(), "trainer/train_lora.py", *lora_args(
            tmp_path, weight, path, max_steps=1, data_cache="none", max_seq_len=512,
            chat_template=TEMPLATES / "devstral.jinja")], 300, cwd=REPO, env=subprocess_env())
        assert run.returncode == status, run.stdout[-2000:] + run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        if system is None:
            assert re.search(f"error: {re.escape(str(path))}: no usable samples .*the chat template writes its own "
                             r"system prompt of \d+ tokens .* or give them a system message of their own", run.stderr)
        else:
            assert f"{path}: kept 4 samples, dropped 0" in run.stdout
