"""train_lora.py end to end on a tiny MiniMind (in-process, through the script's own entry point; flag refusals
through the real command line)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from model.model_lora import apply_lora, load_lora_state_dict
from model.model_minimind import load_minimind
from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    run_inprocess,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    write_chat_data,
)
from trainer.train_lora import main


@pytest.fixture()
def world(tmp_path):
    """A tiny base .pth and 9 conversations of different lengths (a global batch of 8 leaves 1 for step 2)."""
    tokenizer_dir()
    return tmp_path, save_tiny_minimind(tmp_path / "full_sft_64.pth"), write_chat_data(tmp_path / "data.jsonl", 9)


def _peft_weights(out):
    return load_file(out / "lora_identity_64" / "adapter_model.safetensors")


@pytest.mark.parametrize("grouped", [0, 1])
def test_batch_8_equals_batch_2_times_accumulation_4(world, grouped, capsys):
    """Also with --group_by_length, whose order is made per optimizer step (here: the 8 longest samples, then
    the shortest), so it does not depend on how a step is cut into micro-batches."""
    tmp, weight, data = world
    results = []
    for name, batch, accum in (("a", 8, 1), ("b", 2, 4)):
        out = tmp / name
        argv = lora_args(tmp, weight, data, save_dir=out, batch_size=batch, accumulation_steps=accum, epochs=1,
                         learning_rate=1e-2, group_by_length=grouped)
        assert run_inprocess(main, argv) == 0
        assert ("grouped by length" in capsys.readouterr().out) == bool(grouped)
        history = torch.load(out / "lora_identity_64_resume.pth", weights_only=False)["state"]["history"]
        results.append((_peft_weights(out), history))
    (wa, ha), (wb, hb) = results
    assert wa.keys() == wb.keys() and len(wa) == 2 * 7 * 2  # A and B on the 7 linears of both layers
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)
    assert [s for s, _ in ha["train"]] == [1, 2]
    # Adam hides a wrong gradient scale; the loss and the gradient norm do not.
    for name in ("train", "grad_norm"):
        for (_, x), (_, y) in zip(ha[name], hb[name]):
            assert x == pytest.approx(y, rel=1e-5)


def test_outputs_lora_pth_peft_dir_config_plot_resume(world, capsys):
    tmp, weight, data = world
    out = tmp / "out"
    argv = lora_args(tmp, weight, data, batch_size=4, max_steps=3, save_interval=2, val_fraction=0.25,
                     eval_interval=2, learning_rate=1e-2, lora_rank=8, lora_alpha=16)
    assert run_inprocess(main, argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"step 2/3 \| val_loss \d+\.\d+", printed) and "step 3/3 | val_loss" in printed

    # MiniMind's LoRA layout: only `<module>.lora.A/B.weight`, fp16, scale folded into B.
    pth = torch.load(out / "lora_identity_64.pth", weights_only=True)
    assert pth and all(re.fullmatch(r"model\.layers\.\d\.\w+\.\w+_proj\.lora\.[AB]\.weight", k) for k in pth)
    assert all(v.dtype == torch.float16 for v in pth.values())

    # The resume file: LoRA weights (fp32), optimizer, position, RNG; never the frozen base.
    resume = torch.load(out / "lora_identity_64_resume.pth", weights_only=False)
    assert resume["trainable"] and all("lora_" in k for k in resume["trainable"])
    assert resume["state"]["step"] == 3 and resume["optimizer"]["state"] and resume["rng"]
    for key, value in resume["trainable"].items():
        module, ab = re.fullmatch(r"(.+)\.lora_([AB])", key).groups()
        expected = value * 2.0 if ab == "B" else value  # scale alpha/r = 2 goes into MiniMind's B
        torch.testing.assert_close(pth[f"{module}.lora.{ab}.weight"].float(), expected, atol=2e-3, rtol=1e-3)

    config = json.loads((out / "lora_identity_64.json").read_text())
    assert config["args"]["lora_rank"] == 8 and config["step"] == 3 and config["total_steps"] == 3
    assert config["model_config"]["hidden_size"] == 64 and len(config["lora_targets"]) == 14
    assert (out / "lora_identity_64_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(resume["state"]["history"]["val"]) == 2

    # The PEFT directory: PEFT itself loads it and computes the trained model's function.
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 6400, (2, 12))
    ours = load_minimind(weight)
    apply_lora(ours, rank=8, alpha=16)
    load_lora_state_dict(ours, resume["trainable"])
    theirs = peft.PeftModel.from_pretrained(load_minimind(weight), str(out / "lora_identity_64")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.eval()(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(load_minimind(weight)(ids).logits, ours(ids).logits, atol=1e-4)  # it did train


def test_bad_data_exits_2_with_file_and_line(world, capsys):
    tmp, weight, data = world
    lines = data.read_text().splitlines()
    lines[2] = '{"conversations": [{"role": "user", "content": "hi"}'  # truncated JSON on line 3
    data.write_text("\n".join(lines) + "\n")
    assert run_inprocess(main, lora_args(tmp, weight, data)) == 2
    err = capsys.readouterr().err
    assert f"{data}:3:" in err and "Traceback" not in err


def test_ddp_without_torchrun_is_a_clear_error(world, capsys, monkeypatch):
    tmp, weight, data = world
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert run_inprocess(main, lora_args(tmp, weight, data) + ["--ddp"]) == 2
    err = capsys.readouterr().err
    assert "--ddp needs several processes started by torchrun" in err and "Traceback" not in err


def test_flags_that_contradict_the_file_stop_with_its_message(world, capsys):
    tmp, weight, data = world
    assert run_inprocess(main, lora_args(tmp, weight, data, hidden_size=128)) == 2
    err = capsys.readouterr().err
    assert "hidden_size=64" in err and "--hidden_size 64" in err and "Traceback" not in err
    assert run_inprocess(main, lora_args(tmp, "full_sft", data, save_dir=tmp, hidden_size=768)) == 2
    err = capsys.readouterr().err
    assert "full_sft_768.pth does not exist" in err and "full_sft_64.pth" in err


def test_use_compile_with_packing_trains_the_eager_lora(world, capsys):
    """--use_compile 1 --packing (compile_decoder; CUDA graphs only on a GPU) against the same run eager:
    the same LoRA and loss history, validation still runs (eagerly) under the compiled decoder, and the
    epoch's short last step (fewer packed rows than --batch_size) reuses the one compiled graph."""
    from torch._dynamo.utils import counters

    tmp, weight, data = world
    runs = []
    for name, compile_flag in (("eager", "0"), ("compiled", "1")):
        out = tmp / name
        torch._dynamo.reset()
        counters.clear()
        argv = lora_args(tmp, weight, data, save_dir=out, batch_size=4, epochs=1, packing=True,
                         max_seq_len=64, val_fraction=0.25, eval_interval=1, learning_rate=1e-2,
                         use_compile=compile_flag)
        assert run_inprocess(main, argv) == 0
        runs.append((_peft_weights(out), torch.load(out / "lora_identity_64_resume.pth",
                                                    weights_only=False)["state"]["history"]))
    out = capsys.readouterr().out
    assert "; compiled" in out
    # 7 training samples make 5 to 7 packed rows of 64; --batch_size 4 samples of ~39 tokens = 2 rows per
    # micro-batch: 3 steps, the last with fewer rows
    assert "packed: 2 row(s) of 64 tokens per micro-batch" in out
    assert "training steps 1..3 (3 per epoch)" in out
    # Compiled per layer (--compile_scope auto): one graph that both layers share (the first layer's input is
    # made to need a gradient too); the short last step is padded to the same shape and adds none.
    assert counters["stats"]["unique_graphs"] == 1
    (we, he), (wc, hc) = runs
    for key in we:
        torch.testing.assert_close(wc[key], we[key], atol=1e-5, rtol=0)
    for name in ("train", "val"):
        assert len(hc[name]) == len(he[name]) > 0
        for (_, x), (_, y) in zip(hc[name], he[name]):
            assert x == pytest.approx(y, rel=1e-5)


def _cli(tmp, weight, data, **flags):
    """trainer/train_lora.py run as a user runs it, on the tiny base, one step."""
    argv = lora_args(tmp, weight, data, max_steps=1, **flags)
    return run_cli([python(), "trainer/train_lora.py", *argv], timeout=180, cwd=REPO, env=subprocess_env())


USELESS = "above the rank any layer it sets can use; B·A has rank at most min(in_features, out_features), largest"


@pytest.mark.parametrize("flags, line", [
    (dict(lora_rank=100000), f"--lora_rank 100000: {USELESS} 64 (model.layers.0.self_attn.q_proj); pass 64 or less"),
    (dict(lora_targets="k_proj", lora_rank=33),
     f"--lora_rank 33: {USELESS} 32 (model.layers.0.self_attn.k_proj); pass 32 or less"),
    (dict(lora_rank_pattern="k_proj=33"),
     f"--lora_rank_pattern k_proj=33: {USELESS} 32 (model.layers.0.self_attn.k_proj); pass 32 or less"),
    (dict(lora_rank=0), "--lora_rank must be at least 1 (got 0)"),
])
def test_a_rank_no_targeted_layer_can_use_is_refused_with_the_largest_useful_one(world, flags, line):
    """--lora_rank 100000 allocated factors until the process was killed (64 is the tiny base's widest
    min(in, out); its k_proj and v_proj have 32 outputs)."""
    tmp, weight, data = world
    run = _cli(tmp, weight, data, **flags)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [f"error: {line}"], run.stdout + run.stderr


def test_a_rank_useful_to_some_targeted_layers_trains(world):
    """64 is above k_proj's 32 outputs but q_proj's rank: as PEFT, the narrower layers keep a full-rank update."""
    tmp, weight, data = world
    run = _cli(tmp, weight, data, lora_rank=64)
    assert run.returncode == 0, run.stdout + run.stderr


def test_val_fraction_that_leaves_too_little_to_train_on_is_refused(world):
    """0.999 held out 8 of 9 samples and trained on 1; a single sample, held out, left none."""
    tmp, weight, data = world
    run = _cli(tmp, weight, data, val_fraction=0.999)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --val_fraction must be in [0, 0.5] (got 0.999): more than half held out leaves less to train on than "
        "to evaluate; a larger validation set goes in --val_data_path"], run.stdout + run.stderr
    one = write_chat_data(tmp / "one.jsonl", 1)
    run = _cli(tmp, weight, one, val_fraction=0.5)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"error: --val_fraction 0.5: {one} holds 1 sample(s); 1 held out for validation would leave 0 to train on; "
        "pass a --val_data_path, or leave out --val_fraction"], run.stdout + run.stderr
    two = write_chat_data(tmp / "two.jsonl", 2)
    run = _cli(tmp, weight, two, val_fraction=0.5)  # the smallest split that works: one sample each side
    assert run.returncode == 0 and "validation: 1 sample(s) held out of 2 (--val_fraction)" in run.stdout, run.stderr


@pytest.mark.parametrize("flag", ["--save_dir", "--out_dir"])
def test_an_empty_save_dir_is_refused(world, flag):
    """--save_dir "" wrote the run into the default folder, as if the flag were absent."""
    tmp, weight, data = world
    argv = [a for a in lora_args(tmp, weight, data, max_steps=1) if a != str(tmp / "out")]
    argv[argv.index("--save_dir")] = flag
    argv.insert(argv.index(flag) + 1, "")
    default = tmp / "default"
    run = run_cli([python(), str(REPO / "trainer" / "train_lora.py"), *argv], timeout=180, cwd=tmp,
                  env=subprocess_env(MINILORA_OUT_DIR=str(default)))
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --save_dir is empty, which would write into the current directory; pass a folder (. for the current "
        "one)"], run.stdout + run.stderr
    assert not default.exists() and sorted(p.name for p in tmp.iterdir()) == ["data.jsonl", "full_sft_64.pth"]
