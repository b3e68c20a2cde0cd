"""The other jobs on the same engine: pretrain a new MiniMind -> full SFT -> LoRA, and LoRA on a transformers dir."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from model.model_minimind import MiniMindForCausalLM, load_minimind
from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    run_inprocess,
    save_tiny_minimind,
    subprocess_env,
    tiny_config,
    tokenizer_dir,
    write_chat_data,
)
from trainer import train_full_sft, train_lora, train_pretrain
from trainer.logger import shown_path


def _flags(**kw: object) -> list[str]:
    base = {"device": "cpu", "num_workers": 0, "log_interval": 1, "batch_size": 4, "seed": 3}
    return [x for k, v in {**base, **kw}.items() for x in (f"--{k}", str(v))]


def _write_texts(path, n: int) -> None:
    words = "the cat sat on a mat and one two three four five is after before".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(5 + i % 9))}) + "\n")


def test_pretrain_then_full_sft_then_lora(tmp_path, capsys):
    tok = tokenizer_dir()
    out = tmp_path / "out"
    _write_texts(tmp_path / "text.jsonl", 12)
    write_chat_data(tmp_path / "chat.jsonl", 8)

    # A new MiniMind sized by the flags, vocabulary from the tokenizer.
    assert run_inprocess(train_pretrain.main, _flags(
        save_dir=out, data_path=tmp_path / "text.jsonl", hidden_size=64, num_hidden_layers=2, tokenizer_path=tok,
        max_steps=3, learning_rate=1e-3)) == 0
    trained = torch.load(out / "pretrain_64_resume.pth", weights_only=False)["trainable"]
    pth = load_minimind(out / "pretrain_64.pth")  # MiniMind's layout, fp16 like MiniMind's own files
    assert pth.config.hidden_size == 64 and pth.config.num_hidden_layers == 2 and pth.config.vocab_size == 6400
    for key, value in pth.state_dict().items():
        torch.testing.assert_close(value.float(), trained[key], atol=1e-3, rtol=1e-3)
    folder = AutoModelForCausalLM.from_pretrained(out / "pretrain_64")  # the model directory, fp32
    for key, value in folder.state_dict().items():
        torch.testing.assert_close(value, trained[key], atol=0, rtol=0)
    assert AutoTokenizer.from_pretrained(out / "pretrain_64").get_vocab() == AutoTokenizer.from_pretrained(tok).get_vocab()

    # Full SFT continues from it by MiniMind name: every tensor trains.
    assert run_inprocess(train_full_sft.main, _flags(
        save_dir=out, from_weight="pretrain", data_path=tmp_path / "chat.jsonl", tokenizer_path=tok, max_steps=2,
        learning_rate=1e-3)) == 0
    sft = torch.load(out / "full_sft_64_resume.pth", weights_only=False)
    assert sft["state"]["step"] == 2 and sft["config"]["base_model"] == str(out / "pretrain_64.pth")
    changed = [k for k in trained if not torch.equal(sft["trainable"][k], trained[k])]
    assert set(changed) == set(trained)
    assert (out / "full_sft_64.pth").is_file() and (out / "full_sft_64_loss.png").is_file()

    # LoRA on the full-SFT model directory: its own tokenizer, so no warning about the repo's.
    capsys.readouterr()
    assert run_inprocess(train_lora.main, _flags(
        save_dir=out, from_weight=out / "full_sft_64", data_path=tmp_path / "chat.jsonl", max_steps=2,
        lora_rank=4)) == 0
    printed = capsys.readouterr().out
    assert "warning: using the repo's tokenizer" not in printed and "done:" in printed
    assert (out / "lora_identity_64.pth").is_file()


def test_lora_on_a_transformers_model_directory(tmp_path):
    tok = tokenizer_dir()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    model.save_pretrained(tmp_path / "qwen3")
    AutoTokenizer.from_pretrained(tok).save_pretrained(tmp_path / "qwen3")
    data = write_chat_data(tmp_path / "chat.jsonl", 6)
    assert run_inprocess(train_lora.main, _flags(
        save_dir=tmp_path / "out", from_weight=tmp_path / "qwen3", data_path=data, max_steps=2, lora_rank=4,
        lora_targets="q_proj,v_proj")) == 0
    sd = torch.load(tmp_path / "out" / "lora_identity_32.pth", weights_only=True)
    assert len(sd) == 2 * 2 * 2 and all(".q_proj." in k or ".v_proj." in k for k in sd)
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(tmp_path / "qwen3"),
                                            str(tmp_path / "out" / "lora_identity_32"))
    assert sorted(loaded.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


def test_default_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from trainer.args import parse_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINILORA_OUT_DIR", raising=False)
    args = parse_args("lora", "t", [])
    assert args.save_dir == str(REPO / "out") and args.data_path == str(REPO / "dataset" / "lora_identity.jsonl")
    assert parse_args("full_sft", "t", []).data_path == str(REPO / "dataset" / "sft_demo.jsonl")
    assert parse_args("pretrain", "t", []).data_path == str(REPO / "dataset" / "pretrain_demo.jsonl")


def test_no_run_saves_over_the_model_or_lora_it_starts_from(tmp_path, capsys):
    """MiniMind's names make it easy to name the output as the input (`--from_weight full_sft` for a full SFT,
    `--init_lora` of the default LoRA name): each is refused before training, the input left as it was."""
    tok, out = tokenizer_dir(), tmp_path / "out"
    _write_texts(tmp_path / "text.jsonl", 8)
    chat = write_chat_data(tmp_path / "chat.jsonl", 6)
    assert run_inprocess(train_pretrain.main, _flags(
        save_dir=out, data_path=tmp_path / "text.jsonl", hidden_size=64, num_hidden_layers=2, tokenizer_path=tok,
        max_steps=1)) == 0
    base = (out / "pretrain_64.pth").read_bytes()
    capsys.readouterr()
    assert run_inprocess(train_pretrain.main, _flags(
        save_dir=out, from_weight="pretrain", data_path=tmp_path / "text.jsonl", tokenizer_path=tok, max_steps=1)) == 2
    assert (f"error: {shown_path(out / 'pretrain_64.pth')} is where this run writes, and it holds the run's own --from_weight "
            f"{out / 'pretrain_64.pth'}: writing there would replace it. Pass another --save_weight or --save_dir"
            ) in capsys.readouterr().err
    assert (out / "pretrain_64.pth").read_bytes() == base
    # --save_weight names the output, as in MiniMind's train_pretrain.py / train_full_sft.py.
    assert run_inprocess(train_pretrain.main, _flags(
        save_dir=out, from_weight="pretrain", save_weight="pretrain2", data_path=tmp_path / "text.jsonl",
        tokenizer_path=tok, max_steps=1)) == 0
    assert (out / "pretrain2_64.pth").is_file() and (out / "pretrain_64.pth").read_bytes() == base

    lora = _flags(save_dir=out, from_weight="pretrain", data_path=chat, tokenizer_path=tok, max_steps=1)
    assert run_inprocess(train_lora.main, lora) == 0
    adapter = (out / "lora_identity_64.pth").read_bytes()
    capsys.readouterr()
    assert run_inprocess(train_lora.main, lora + ["--init_lora", str(out / "lora_identity_64.pth")]) == 2
    assert "holds the run's own --init_lora" in capsys.readouterr().err
    assert (out / "lora_identity_64.pth").read_bytes() == adapter
    capsys.readouterr()
    assert run_inprocess(train_lora.main, lora + ["--lora_name", "pretrain"]) == 2
    assert "holds the run's own --from_weight" in capsys.readouterr().err
    assert (out / "pretrain_64.pth").read_bytes() == base


def test_minimind_default_bases_and_none(tmp_path, capsys):
    """Without --from_weight, MiniMind's scripts load {save_dir}/full_sft_{hidden} (LoRA) and pretrain_{hidden}
    (full SFT); `--from_weight none` starts a full SFT from a new random model."""
    tok, out = tokenizer_dir(), tmp_path / "out"
    chat = write_chat_data(tmp_path / "chat.jsonl", 6)
    assert run_inprocess(train_full_sft.main, _flags(
        save_dir=out, from_weight="none", hidden_size=64, num_hidden_layers=2, data_path=chat, tokenizer_path=tok,
        max_steps=1, save_weight="pretrain")) == 0
    assert json.loads((out / "pretrain_64.json").read_text())["base_model"] == "new"
    assert run_inprocess(train_full_sft.main, _flags(
        save_dir=out, hidden_size=64, data_path=chat, tokenizer_path=tok, max_steps=1)) == 0
    assert json.loads((out / "full_sft_64.json").read_text())["base_model"] == str(out / "pretrain_64.pth")
    assert run_inprocess(train_lora.main, _flags(save_dir=out, hidden_size=64, data_path=chat, max_steps=1)) == 0
    assert json.loads((out / "lora_identity_64.json").read_text())["base_model"] == str(out / "full_sft_64.pth")
    capsys.readouterr()
    assert run_inprocess(train_lora.main, _flags(save_dir=out, hidden_size=32, data_path=chat, max_steps=1)) == 2
    assert (f"error: no --from_weight given: MiniMind's default base {out / 'full_sft_32.pth'} does not exist, and "
            "the demo base") in capsys.readouterr().err


def test_a_full_sft_save_past_a_file_size_limit_names_the_save_dir(tmp_path, capsys):
    """save_pretrained's writer raises its own error type on EFBIG; the line still names the folder and the fix."""
    import resource

    tok, out = tokenizer_dir(), tmp_path / "out"
    chat = write_chat_data(tmp_path / "chat.jsonl", 6)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # the 64-wide model's files are ~3 MB
    try:
        code = run_inprocess(train_full_sft.main, _flags(
            save_dir=out, from_weight="none", hidden_size=64, num_hidden_layers=2, data_path=chat, tokenizer_path=tok,
            max_steps=1, data_cache="none"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"error: {out}: the disk is full or a file-size limit was hit while saving full_sft_64's files" in err
    assert not [p for p in out.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


@pytest.mark.parametrize("job", ["lora", "full_sft"])
def test_a_template_file_with_a_byte_order_mark_trains_as_the_plain_file(tmp_path, job):
    # The flag check reads it without the mark; the run must too, or U+FEFF opens every chat it learns and the
    # template it saves for chat, eval and merge
    template = (REPO.parent / "shared" / "fixtures" / "templates" / "qwen25.jinja")
    if not template.is_file():
        pytest.skip(f"fixtures not found at {template}")
    text = template.read_text(encoding="utf-8")
    (tmp_path / "bom.jinja").write_bytes(b"\xef\xbb\xbf" + text.encode())
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "chat.jsonl", 4)
    flags = lora_args(tmp_path, weight, data, max_steps=1, chat_template=tmp_path / "bom.jinja")
    if job == "lora":
        assert run_inprocess(train_lora.main, flags) == 0
        saved = (tmp_path / "out" / "lora_identity_64" / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        flags = flags[:flags.index("--lora_rank")] + flags[flags.index("--lora_rank") + 2:]
        assert run_inprocess(train_full_sft.main, flags) == 0
        saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "full_sft_64").chat_template
    assert saved == text


@pytest.mark.parametrize("save_dtype", [None, "float32"])
def test_full_sft_saves_a_bf16_directory_in_bf16_unless_save_dtype_says(tmp_path, save_dtype):
    """A bf16 base comes back bf16 (its config.json's dtype), trained in fp32; --save_dtype float32 keeps fp32."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "qwen3")
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(tmp_path / "qwen3")
    out = tmp_path / "out"
    flags = dict(save_dir=out, from_weight=tmp_path / "qwen3", data_path=write_chat_data(tmp_path / "chat.jsonl", 6),
                 max_steps=2, learning_rate=1e-2)
    assert run_inprocess(train_full_sft.main, _flags(**flags, **({"save_dtype": save_dtype} if save_dtype else {}))) == 0
    trained = torch.load(out / "full_sft_32_resume.pth", weights_only=False)["trainable"]
    assert all(v.dtype == torch.float32 for v in trained.values())  # training and resuming stay fp32
    wanted = getattr(torch, save_dtype or "bfloat16")
    saved = AutoModelForCausalLM.from_pretrained(out / "full_sft_32", dtype="auto")
    assert json.loads((out / "full_sft_32" / "config.json").read_text())["dtype"] == str(wanted).split(".")[1]
    assert saved.lm_head.weight is saved.model.embed_tokens.weight  # still one tied tensor
    for key, value in saved.state_dict().items():
        assert value.dtype == wanted, key
        torch.testing.assert_close(value, trained[key].to(wanted), atol=0, rtol=0)


def test_stored_dtype_reads_either_spelling_of_config_dtype(tmp_path):
    from trainer.base_model import stored_dtype

    for config, wanted in (({"dtype": "bfloat16"}, torch.bfloat16), ({"torch_dtype": "float16"}, torch.float16),
                           ({}, None), ({"dtype": "int8"}, None), ({"dtype": "nonsense"}, None)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert stored_dtype(tmp_path) == wanted, config


@pytest.mark.parametrize("pth_dtype, save_dtype, wanted", [(torch.float16, None, torch.float16),
                                                          (torch.float16, "float32", torch.float32),
                                                          (torch.float32, None, torch.float32)])
def test_full_sft_from_a_pth_saves_its_directory_in_the_pth_dtype_unless_save_dtype_says(
        tmp_path, pth_dtype, save_dtype, wanted):
    """A MiniMind .pth holds fp16 tensors (MiniMind's trainers save .half()): its directory comes back fp16."""
    model = MiniMindForCausalLM(tiny_config(vocab_size=6400)).to(pth_dtype)
    torch.save(model.state_dict(), tmp_path / "base_64.pth")
    out = tmp_path / "out"
    flags = dict(save_dir=out, from_weight=tmp_path / "base_64.pth", tokenizer_path=tokenizer_dir(), max_steps=1,
                 data_path=write_chat_data(tmp_path / "chat.jsonl", 4))
    assert run_inprocess(train_full_sft.main, _flags(**flags, **({"save_dtype": save_dtype} if save_dtype else {}))) == 0
    assert json.loads((out / "full_sft_64" / "config.json").read_text())["dtype"] == str(wanted).split(".")[1]
    saved = AutoModelForCausalLM.from_pretrained(out / "full_sft_64", dtype="auto")
    assert {v.dtype for v in saved.state_dict().values()} == {wanted}


@pytest.mark.parametrize("flags, line", [
    (["--hidden_size", "0"], "error: --hidden_size must be at least 1 (got 0)"),
    (["--num_hidden_layers", "0"], "error: --num_hidden_layers must be at least 1 (got 0)"),
    (["--num_hidden_layers", "-1"], "error: --num_hidden_layers must be at least 1 (got -1)"),
    (["--hidden_size", "24"], "error: --hidden_size 24: a new MiniMind splits it over 8 attention heads of an even "
                              "size each; pass a multiple of 16, such as 512 or 768"),
])
def test_pretrain_refuses_a_model_shape_that_cannot_train(tmp_path, flags, line):
    """A new model of no width or an odd head size ended in a traceback; 0 layers silently built 8, -1 built none."""
    _write_texts(tmp_path / "text.jsonl", 4)
    run = run_cli([python(), "trainer/train_pretrain.py", *flags, *_flags(
        save_dir=tmp_path / "out", data_path=tmp_path / "text.jsonl", tokenizer_path=tokenizer_dir(), max_steps=1)],
        timeout=120, cwd=REPO, env=subprocess_env())
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [line], run.stdout + run.stderr
    assert not (tmp_path / "out").exists()
