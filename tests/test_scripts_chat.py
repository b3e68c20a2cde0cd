"""chat.py: cached decoding equals a plain greedy loop, top-p keeps the nucleus, and the CLI compares."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import model.generate as model_generate
from model.errors import UserError
from model.generate import generate_reply, penalize_repeats, sample_next
from model.model_lora import apply_lora, load_lora, lora_parameters, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts import chat, eval_lora, merge_lora, visualize_lora
from scripts.chat import PROMPTS, parse_args
from tests.test_dataset_masks import with_tokens
from tests.test_dataset_templates import COHERE, LLAMA, TEMPLATES
from tests.train_utils import fill_random
from tests.train_utils import run_cli as run_process
from trainer.logger import shown_path

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "minimind"
CHAT_PY = Path(__file__).resolve().parents[1] / "scripts" / "chat.py"
REPO_TOKENIZER = Path(__file__).resolve().parents[1] / "model" / "tokenizer"
MESSAGES = [
    {"role": "user", "content": "who are you?"},
    {"role": "assistant", "content": "I am a tiny model."},
    {"role": "user", "content": "你好，请介绍一下你自己。"},
]


@pytest.fixture(scope="module")
def tokenizer():
    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"fixtures not found at {TOKENIZER}")
    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny_minimind(generation: int = 3, use_moe: bool = False) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    cfg = MiniMindConfig(
        generation=generation,
        vocab_size=6400,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_moe=use_moe,
        num_experts_per_tok=2,
    )
    return MiniMindForCausalLM(cfg).eval()


def tiny_qwen(**kw: object) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        **kw,
        vocab_size=6400,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        eos_token_id=2,
    )
    return Qwen3ForCausalLM(cfg).eval()


def with_random_lora(model: torch.nn.Module) -> torch.nn.Module:
    apply_lora(model, rank=4, alpha=8)
    fill_random(lora_parameters(model), seed=1, scale=0.3)
    return model


@torch.no_grad()
def manual_greedy(model, tokenizer, messages, max_new_tokens: int) -> list[int]:
    """The reference: re-run the whole sequence every step (no cache), take the argmax, stop at <|im_end|>."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    out, device = [], next(model.parameters()).device
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids + out], device=device)).logits[0, -1].argmax())
        if token == tokenizer.convert_tokens_to_ids("<|im_end|>"):
            break
        out.append(token)
    return out


@pytest.mark.parametrize("kind", ["minimind3", "minimind2_moe", "minimind3_lora", "qwen3"])
def test_greedy_reply_equals_manual_loop(tokenizer, kind):
    model = {
        "minimind3": lambda: tiny_minimind(3),
        "minimind2_moe": lambda: tiny_minimind(2, use_moe=True),
        "minimind3_lora": lambda: with_random_lora(tiny_minimind(3)),
        "qwen3": tiny_qwen,
    }[kind]()
    expected = manual_greedy(model, tokenizer, MESSAGES, max_new_tokens=20)
    pieces, stats = [], {}
    reply = generate_reply(model, tokenizer, MESSAGES, max_new_tokens=20, on_text=pieces.append, stats=stats)
    assert reply == tokenizer.decode(expected, skip_special_tokens=True)
    assert stats["tokens"] == len(expected) > 0
    assert "".join(pieces) == reply  # the streamed pieces add up to the reply


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reply_on_gpu():
    tokenizer = AutoTokenizer.from_pretrained(REPO_TOKENIZER)  # the repo's own: no shared fixtures needed
    model = with_random_lora(tiny_minimind(3)).cuda()
    expected = manual_greedy(model, tokenizer, MESSAGES, max_new_tokens=20)
    assert generate_reply(model, tokenizer, MESSAGES, max_new_tokens=20) == tokenizer.decode(
        expected, skip_special_tokens=True
    )
    model.to(torch.bfloat16)  # the chat default on GPU; sampling draws on the CPU generator
    stats = {}
    generate_reply(
        model, tokenizer, MESSAGES, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=0, stats=stats
    )
    assert stats["tokens"] <= 8


def test_near_zero_top_p_is_greedy(tokenizer):
    model = tiny_minimind(3)
    greedy = generate_reply(model, tokenizer, MESSAGES[:1], max_new_tokens=10)
    sampled = generate_reply(
        model, tokenizer, MESSAGES[:1], max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3
    )
    assert sampled == greedy


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    gen = torch.Generator().manual_seed(0)
    picks = [sample_next(probs.log(), 1.0, 0.7, gen) for _ in range(300)]
    # Sorted: 0.5 (token 1), 0.3 (token 3) reach 0.8 ≥ 0.7, so only tokens 1 and 3 may be drawn,
    # with odds 0.5 : 0.3 after renormalisation.
    assert set(picks) == {1, 3}
    assert 0.5 < picks.count(1) / 300 < 0.75
    assert sample_next(torch.tensor([0.1, 2.0, -1.0]), 0.0, 0.5, None) == 1


def test_repetition_penalty_equals_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    seen = torch.tensor([3, 7, 7, 20, 41])  # a repeated id is penalised once
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits[None].clone())[0]
    torch.testing.assert_close(penalize_repeats(logits, seen, 1.3), expected, rtol=0, atol=0)
    assert penalize_repeats(logits, seen, 1.0) is logits


def test_greedy_with_penalty_equals_transformers_generate(tokenizer):
    model = tiny_qwen()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(ids, add_special_tokens=False).input_ids])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ref = model.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.3, eos_token_id=[2, im_end],
                         attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    ref = ref[: ref.index(im_end)] if im_end in ref else ref
    reply = generate_reply(model, tokenizer, MESSAGES, max_new_tokens=20, repetition_penalty=1.3)
    assert reply == tokenizer.decode(ref, skip_special_tokens=True)


def test_repetition_penalty_changes_a_greedy_loop(tokenizer):
    model = tiny_minimind(3)
    plain = generate_reply(model, tokenizer, MESSAGES[:1], max_new_tokens=30)
    penalised = generate_reply(model, tokenizer, MESSAGES[:1], max_new_tokens=30, repetition_penalty=3.0)
    ids = tokenizer(penalised, add_special_tokens=False).input_ids
    assert penalised != plain
    assert len(set(ids)) > len(set(tokenizer(plain, add_special_tokens=False).input_ids))


def biased_to(model: torch.nn.Module, token: int) -> torch.nn.Module:
    """The model with an lm_head that always prefers `token`: greedy decoding writes it at every step."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[token] = 100.0
    model.lm_head = head
    return model


# (template, its special tokens, eos): a base model's eos is not the turn end of the chat template it is tuned with
TURN_ENDS = {
    "llama31": (LLAMA + ["<|end_of_text|>"], "<|end_of_text|>", "<|eot_id|>"),  # Llama-3's base eos
    "functionary_v32": (LLAMA + ["<|end_of_text|>"], "<|end_of_text|>", "<|eot_id|>"),
    "command_r7b_tools": (COHERE, None, "<|END_OF_TURN_TOKEN|>"),  # MiniMind's base (eos <|im_end|>), Cohere's turns
}


@pytest.mark.parametrize("name", TURN_ENDS)
def test_a_reply_stops_at_the_turn_end_the_template_writes(tokenizer, name):
    # A model that learned the template's turn end writes it after its reply; decoding on past it would ramble
    # into a fake next turn
    tokens, eos, turn_end = TURN_ENDS[name]
    tok = with_tokens(tokenizer, tokens, **({"eos_token": eos} if eos else {}))
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    end = tok.convert_tokens_to_ids(turn_end)
    assert end != tok.eos_token_id
    torch.manual_seed(0)
    model = biased_to(MiniMindForCausalLM(MiniMindConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )).eval(), end)
    model.generation_config.eos_token_id = tok.eos_token_id
    stats = {}
    assert generate_reply(model, tok, MESSAGES, max_new_tokens=8, stats=stats) == ""
    assert stats["tokens"] == 0  # ignoring the turn end, it would write it 8 times


@pytest.mark.parametrize("script", [chat, eval_lora, merge_lora, visualize_lora])
def test_every_flag_has_help(script, capsys):
    parser = script.build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, (
            f"{script.__name__}: {action.option_strings} has no help"
        )
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python scripts/" in out  # the docstring's example commands are part of --help


def test_compare_needs_a_lora():
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--compare"])
    assert exit_info.value.code == 2


def test_minimind_flag_spellings_and_bad_values(tmp_path):
    # MiniMind's scripts say --out_dir, --dim and --n_layers
    assert vars(parse_args(["--out_dir", str(tmp_path), "--dim", "768", "--n_layers", "16"])) == vars(
        parse_args(["--save_dir", str(tmp_path), "--hidden_size", "768", "--num_hidden_layers", "16"]))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--history_turns", "-1"])
    assert exit_info.value.code == 2
    # eval_llm.py's: --historys counts messages (two a turn), --open_thinking 0/1
    minimind = parse_args(["--historys", "4", "--open_thinking", "1"])
    assert (minimind.history_turns, minimind.think, minimind.template_kwargs["enable_thinking"]) == (2, True, True)
    assert parse_args(["--open_thinking", "0"]).think is False and parse_args([]).think is False
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--historys", "3"])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny MiniMind model directory with MiniMind's tokenizer, and a LoRA trained on nothing."""
    tmp = tmp_path_factory.mktemp("chat")
    base = tiny_minimind(3)
    base.save_pretrained(tmp / "base")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, tmp / "base" / f)
    save_lora(with_random_lora(tiny_minimind(3)), tmp / "lora.pth")
    return tmp


def run_cli(*flags: str, stdin: str = "") -> str:
    result = run_process([sys.executable, str(CHAT_PY), *flags], timeout=600, input=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_compare_prints_both_answers(model_dir, tokenizer):
    prompts = PROMPTS[:2]  # "who are you?" and a Chinese one; all six would only cost time
    out = run_cli(
        "--from_weight",
        str(model_dir / "base"),
        "--lora_path",
        str(model_dir / "lora.pth"),
        "--compare",
        "--max_new_tokens",
        "8",
        "--repetition_penalty",
        "1.2",
        "--device",
        "cpu",
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
    )
    base = MiniMindForCausalLM.from_pretrained(model_dir / "base").eval()
    tuned = MiniMindForCausalLM.from_pretrained(model_dir / "base").eval()
    load_lora(tuned, model_dir / "lora.pth")
    for prompt in prompts:
        assert f"user: {prompt}\n" in out
        messages = [{"role": "user", "content": prompt}]
        base_reply = generate_reply(base, tokenizer, messages, max_new_tokens=8, repetition_penalty=1.2)
        lora_reply = generate_reply(tuned, tokenizer, messages, max_new_tokens=8, repetition_penalty=1.2)
        assert base_reply != lora_reply  # otherwise the comparison would show nothing
        # The CLI merges the LoRA into the weights; the unmerged reference must still agree.
        assert f"base: {base_reply}\n  [" in out
        assert f"lora: {lora_reply}\n  [" in out
    assert out.count("tokens/s]") == 2 * len(prompts)


def test_cli_interactive_keeps_history(model_dir, tokenizer):
    out = run_cli(
        "--from_weight",
        str(model_dir / "base"),
        "--interactive",
        "--max_new_tokens",
        "6",
        "--repetition_penalty",
        "1.0",
        "--device",
        "cpu",
        stdin="hello\nwhat did I say?\n\n",
    )
    base = MiniMindForCausalLM.from_pretrained(model_dir / "base").eval()
    first = generate_reply(base, tokenizer, [{"role": "user", "content": "hello"}], max_new_tokens=6)
    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "what did I say?"},
    ]
    second = generate_reply(base, tokenizer, history, max_new_tokens=6)
    assert f"base: {first}\n  [" in out
    assert f"base: {second}\n  [" in out


def test_a_lora_on_a_tied_head_answers_unmerged(tmp_path, tokenizer):
    # lm_head shares its weight with embed_tokens: merging would change the embedding too, so chat runs it unmerged
    base = tiny_qwen(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    tuned = tiny_qwen(tie_word_embeddings=True)
    apply_lora(tuned, rank=4, alpha=8, targets=["q_proj", "lm_head"])
    fill_random(lora_parameters(tuned), seed=1, scale=0.3)
    save_lora(tuned, tmp_path / "lora")
    models, _ = chat.build_models(parse_args(["--from_weight", str(tmp_path / "base"), "--lora_path",
                                              str(tmp_path / "lora"), "--device", "cpu"]))
    (label, model), = models
    ids = torch.randint(0, 6400, (1, 12), generator=torch.Generator().manual_seed(0))
    reference = tiny_qwen(tie_word_embeddings=True)
    load_lora(reference, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-3)


def test_minimind_eval_llm_names_for_the_base_and_the_lora(tmp_path):
    # MiniMind's eval_llm.py: --weight full_sft --lora_weight lora_identity, both names in --save_dir by size
    from model.model_minimind import load_minimind
    from tests.train_utils import save_tiny_minimind, tokenizer_dir

    save_tiny_minimind(tmp_path / "full_sft_64.pth")
    base = load_minimind(tmp_path / "full_sft_64.pth")
    with_random_lora(base)
    save_lora(base, tmp_path / "lora_x_64.pth")
    common = ["--save_dir", str(tmp_path), "--tokenizer_path", str(tokenizer_dir()), "--device", "cpu"]
    (_, by_name), = chat.build_models(parse_args([*common, "--weight", "full_sft", "--lora_weight", "lora_x"]))[0]
    (_, by_path), = chat.build_models(parse_args([*common, "--from_weight", str(tmp_path / "full_sft_64.pth"),
                                                  "--lora_path", str(tmp_path / "lora_x_64.pth")]))[0]
    (_, plain), = chat.build_models(parse_args([*common, "--weight", "full_sft", "--lora_weight", "None"]))[0]
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_name(ids).logits, by_path(ids).logits)
        assert not torch.allclose(by_name(ids).logits, plain(ids).logits, atol=1e-3)
    with pytest.raises(UserError, match="no such file, and no .*lora_y_64.pth for it as a MiniMind name"):
        chat.build_models(parse_args([*common, "--weight", "full_sft", "--lora_weight", "lora_y"]))


def test_a_tokenizer_without_a_chat_template_is_said_at_start_and_chat_template_fixes_it(model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(model_dir / "base", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chatml.jinja").write_text(template)
    flags = ["--from_weight", str(base), "--max_new_tokens", "2", "--device", "cpu", "--prompt", "hi"]
    result = run_process([sys.executable, str(CHAT_PY), *flags], timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {base} has no chat template: pass a template file with --chat_template" in result.stderr
    assert "base:" not in result.stdout
    out = run_cli(*flags, "--chat_template", str(tmp_path / "chatml.jinja"))
    assert f"chat template: {shown_path(tmp_path / 'chatml.jinja')}" in out and "user: hi\n" in out


def test_a_lora_chats_with_the_chat_template_it_was_trained_with(tmp_path):
    """train_lora.py --chat_template saves the template in the LoRA's folder; chat.py, given only the LoRA, renders
    the prompt with it (here Qwen2.5's, whose default system prompt changes the context and so the reply)."""
    from model.model_minimind import load_minimind
    from tests.train_utils import lora_args, run_inprocess, save_tiny_minimind, write_chat_data
    from trainer.train_lora import main as train

    qwen25 = TOKENIZER.parents[1] / "templates" / "qwen25.jinja"
    if not qwen25.is_file():
        pytest.skip(f"fixtures not found at {qwen25}")
    weight = save_tiny_minimind(tmp_path / "base.pth")
    data = write_chat_data(tmp_path / "chat.jsonl", 4)
    assert run_inprocess(train, lora_args(tmp_path, weight, data, max_steps=1, chat_template=qwen25)) == 0
    lora = tmp_path / "out" / "lora_identity_64.pth"
    saved = tmp_path / "out" / "lora_identity_64" / "chat_template.jinja"
    assert saved.read_text() == qwen25.read_text()

    out = run_cli("--lora_path", str(lora), "--prompt", "hello", "--max_new_tokens", "8", "--device", "cpu")
    model = load_minimind(weight)
    load_lora(model, lora)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    messages = [{"role": "user", "content": "hello"}]
    own = generate_reply(model.eval(), tokenizer, messages, max_new_tokens=8)
    tokenizer.chat_template = saved.read_text()
    learned = generate_reply(model, tokenizer, messages, max_new_tokens=8)
    assert learned != own  # otherwise the reply could not tell the templates apart
    assert f"chat template: {shown_path(saved)}\n" in out
    assert f"lora: {learned}\n  [" in out


# Llama-3.1's stop ids: its generation_config.json lists all three, its config.json the first, its tokenizer the last
LLAMA31_STOPS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]


def llama31_dir(path: Path, tokenizer, writes: str | None = None) -> Path:
    """A tiny Llama directory shaped as Llama-3.1-Instruct ships: its special tokens, chat template and eos ids. With
    `writes`, every position's hidden state is the same vector, which only that token's lm_head row matches: greedy
    decoding writes that token at every step."""
    tok = with_tokens(tokenizer, LLAMA + ["<|end_of_text|>"], eos_token="<|eot_id|>")
    tok.chat_template = (TEMPLATES / "llama31.jinja").read_text()
    stops = [tok.convert_tokens_to_ids(t) for t in LLAMA31_STOPS]
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=bos,
                                         eos_token_id=stops[0]))
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=stops, do_sample=True, temperature=0.6,
                                               top_p=0.9)
    if writes is not None:
        with torch.no_grad():
            same = torch.randn(model.config.hidden_size)
            model.model.embed_tokens.weight[:] = same
            for layer in model.model.layers:  # no layer adds to the residual stream
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.lm_head.weight.zero_()
            model.lm_head.weight[tok.convert_tokens_to_ids(writes)] = same
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("stop", LLAMA31_STOPS)
def test_chat_and_eval_stop_at_every_eos_id_of_a_llama31_directory(tmp_path, tokenizer, capsys, stop):
    # A Llama-3.1 model ends a built-in tool call with <|eom_id|>: only generation_config.json lists it
    base = llama31_dir(tmp_path / "base", tokenizer, writes=stop)
    apply_lora(model := LlamaForCausalLM.from_pretrained(base), rank=2, targets="q_proj")
    save_lora(model, tmp_path / "lora")
    capsys.readouterr()
    chat.main(["--from_weight", str(base), "--lora_path", str(tmp_path / "lora"), "--compare", "--prompt", "hi",
               "--max_new_tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "base: \n  [0 tokens" in out and "lora: \n  [0 tokens" in out, out  # else it writes `stop` 4 times
    eval_lora.main(["--from_weight", str(base), "--lora_path", str(tmp_path / "lora"), "--max_samples", "1",
                    "--n_prompts", "1", "--max_new_tokens", "4", "--device", "cpu", "--json", str(tmp_path / "e.json")])
    generations = json.loads((tmp_path / "e.json").read_text())["generations"]
    assert [(g["base"], g["lora"]) for g in generations] == [("", "")]


def count_calls(monkeypatch, module: object, name: str) -> list:
    """Record each call of module.name, which still runs as before."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


def test_the_stop_ids_are_found_once_per_model_not_once_per_reply(tmp_path, tokenizer, monkeypatch, capsys):
    # stop_token_ids renders the chat template as a probe (load_chat_format): once per model of the session is enough
    base = llama31_dir(tmp_path / "base", tokenizer)
    apply_lora(model := LlamaForCausalLM.from_pretrained(base), rank=2, targets="q_proj")
    save_lora(model, tmp_path / "lora")
    probes = count_calls(monkeypatch, model_generate, "load_chat_format")
    chat.main(["--from_weight", str(base), "--lora_path", str(tmp_path / "lora"), "--compare", "--prompt", "hi",
               "--prompt", "who are you?", "--prompt", "bye", "--max_new_tokens", "2", "--device", "cpu"])
    assert capsys.readouterr().out.count("tokens/s]") == 6
    assert len(probes) == 2  # base and lora, whatever the number of prompts
    probes.clear()
    eval_lora.main(["--from_weight", str(base), "--lora_path", str(tmp_path / "lora"), "--max_samples", "3",
                    "--n_prompts", "3", "--max_new_tokens", "2", "--device", "cpu"])
    assert capsys.readouterr().out.count("lora: ") == 3
    assert len(probes) == 1  # the LoRA, added in place, changes no stop id


def test_a_base_on_transformers_own_class_is_said_without_the_training_paths_chat_and_merge_lack(tmp_path, tokenizer):
    # A sliding window chat cannot bound: transformers' MistralForCausalLM runs it; packing and compiling are the
    # trainer's, so the line of chat.py and merge_lora.py names only the decoder
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, sliding_window=16,
                                            max_position_embeddings=64))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    apply_lora(base, rank=2, targets="q_proj")
    save_lora(base, tmp_path / "lora")
    scripts = {"chat": [CHAT_PY, "--prompt", "hi", "--max_new_tokens", "2", "--device", "cpu"],
               "merge": [CHAT_PY.with_name("merge_lora.py"), "--save_dir", tmp_path / "out"]}
    for script, flags in scripts.items():
        run = run_process([sys.executable, *map(str, flags), "--from_weight", str(tmp_path / "base"),
                           "--lora_path", str(tmp_path / "lora")], timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        lines = [line for line in run.stdout.splitlines() if "runs on transformers'" in line]
        assert lines == [f"model: {tmp_path / 'base'} runs on transformers' MistralForCausalLM, not the fast decoder: "
                         "its sliding window (16 tokens) is shorter than max_position_embeddings 64"], (script, lines)
