"""A LoRA made for another base (MoE vs dense, other layer count, other sizes) stops every loader with one line that
names the LoRA, the base and what differs; MiniMind's own LoRA files keep loading on their own bases."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.model_lora import LoRAError, apply_lora, load_lora, save_lora
from model.model_minimind import MiniMindForCausalLM, load_minimind
from scripts import chat, eval_lora, merge_lora
from tests.train_utils import (
    REPO,
    fill_random,
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
from trainer.train_lora import main as train

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimind"


@pytest.fixture()
def bases(tmp_path: Path) -> dict[str, Path]:
    """Tiny dense, MoE and 3-layer MiniMind bases of one hidden size, named as MiniMind names them."""
    return {"dense": save_tiny_minimind(tmp_path / "dense" / "full_sft_64.pth"),
            "moe": save_tiny_minimind(tmp_path / "moe" / "full_sft_64_moe.pth", use_moe=True),
            "deep": save_tiny_minimind(tmp_path / "deep" / "full_sft_64.pth", num_hidden_layers=3)}


def lora_of(base: Path, path: Path, targets: str | None = None) -> Path:
    """A LoRA with non-zero factors for `base`, saved at `path`."""
    model = load_minimind(base)
    apply_lora(model, rank=4, targets=targets)
    fill_random([p for n, p in model.named_parameters() if "lora_" in n])
    save_lora(model, path)
    return path


def every_loader(lora: Path, base: Path, tmp: Path, capsys: pytest.CaptureFixture) -> list[str]:
    """The error line of chat.py, eval_lora.py, merge_lora.py and train_lora.py --init_lora for `lora` on `base`."""
    common = ["--from_weight", str(base), "--tokenizer_path", str(tokenizer_dir())]
    data = write_chat_data(tmp / "data.jsonl", 4)
    runs = [(chat.main, [*common, "--lora_path", str(lora), "--device", "cpu", "--prompt", "hi"]),
            (eval_lora.main, [*common, "--lora_path", str(lora), "--device", "cpu", "--data_path", str(data)]),
            (merge_lora.main, [*common, "--lora_path", str(lora), "--save_dir", str(tmp / "merged")])]
    lines = []
    for main, argv in runs:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert run_inprocess(train, lora_args(tmp, base, data, init_lora=lora, max_steps=1)) == 2
    lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp / "merged").exists() and not (tmp / "out").exists()
    return lines


def test_an_moe_lora_on_a_dense_base_is_refused_by_every_loader(bases, tmp_path, capsys):
    lora = lora_of(bases["moe"], tmp_path / "moe_all_linear.pth")
    for line in every_loader(lora, bases["dense"], tmp_path, capsys):
        assert line.startswith(f"error: {lora}: does not fit the base {bases['dense']}: the LoRA has expert layers "
                               "(MoE) and the base is dense ("), line
        assert "'model.layers.0.mlp.experts.0.gate_proj" in line, line
    # MiniMind's own choice of layers (q_proj, o_proj) fits both: the name MiniMind gives the file tells them apart
    square = lora_of(bases["moe"], tmp_path / "lora_identity_64_moe.pth", targets="square")
    for line in every_loader(square, bases["dense"], tmp_path, capsys):
        assert line == (f"error: {square}: does not fit the base {bases['dense']}: the LoRA's name says MoE (MiniMind "
                        "names it {name}_{hidden_size}_moe) and the base is dense; pass the base it was trained on "
                        "(or rename the file if its name is wrong)"), line


def test_a_dense_lora_on_an_moe_base_is_refused(bases, tmp_path, capsys):
    lora = lora_of(bases["dense"], tmp_path / "dense_all_linear.pth")
    with pytest.raises(LoRAError, match=r"the LoRA is for a dense MLP and the base has expert layers \(MoE\) \(key "
                                        r"'model\.layers\.0\.mlp\.gate_proj\.lora\.A\.weight'\)"):
        load_lora(load_minimind(bases["moe"]), lora, base="the MoE base")
    square = lora_of(bases["dense"], tmp_path / "lora_identity_64.pth", targets="square")
    line = every_loader(square, bases["moe"], tmp_path, capsys)[0]
    assert f"{square}: does not fit the base {bases['moe']}: the LoRA's name says dense" in line, line


def test_a_lora_of_a_deeper_model_names_the_layer_counts(bases, tmp_path):
    lora = lora_of(bases["deep"], tmp_path / "deep.pth")
    with pytest.raises(LoRAError, match=r"deep\.pth: does not fit the base 2-layer: the LoRA has layer 2 and the base "
                                        r"has 2 layers \(key 'model\.layers\.2\."):
        load_lora(load_minimind(bases["dense"]), lora, base="2-layer")


def test_a_shape_mismatch_names_the_lora_the_base_the_tensor_and_both_shapes(bases, tmp_path, capsys):
    narrow = MiniMindForCausalLM(tiny_config(hidden_size=32))
    apply_lora(narrow, rank=4, targets="q_proj")
    save_lora(narrow, tmp_path / "narrow.pth")
    line = every_loader(tmp_path / "narrow.pth", bases["dense"], tmp_path, capsys)
    want = (f"error: {tmp_path / 'narrow.pth'}: does not fit the base {bases['dense']}: "
            "'model.layers.0.self_attn.q_proj.lora.A.weight' has shape [4, 32], the base's "
            "'model.layers.0.self_attn.q_proj' (64 -> 64) needs [4, 64]; pass the base it was trained on")
    assert line == [want] * 4


def test_a_peft_adapter_of_a_shallower_model_is_refused(bases, tmp_path, capsys):
    """Its target_modules select every q_proj of the base, and layer 2's has no factors: PEFT would leave it bare."""
    lora = lora_of(bases["dense"], tmp_path / "shallow")
    for line in every_loader(lora, bases["deep"], tmp_path, capsys):
        assert line == (f"error: {lora}: does not fit the base {bases['deep']}: the target_modules of "
                        "adapter_config.json select its 'model.layers.2.self_attn.q_proj', which the adapter has no "
                        "factors for (the LoRA has factors for 2 layers and the base has 3); pass the base it was "
                        "trained on"), line
    assert len(load_lora(load_minimind(bases["dense"]), lora)) == 14  # on its own base it loads


def test_a_minimind_lora_of_a_shallower_model_is_refused(bases, tmp_path, capsys):
    """MiniMind's own file (2 layers, q_proj and o_proj) on a 3-layer base of the same width: MiniMind's loader fails
    on it (a square layer without factors); here every loader says so instead of leaving layer 2 bare."""
    lora = FIXTURES / "minimind3_dense" / "lora_rank4.pth"
    if not lora.is_file():
        pytest.skip(f"fixtures not found at {FIXTURES}")
    for line in every_loader(lora, bases["deep"], tmp_path, capsys):
        assert line == (f"error: {lora}: does not fit the base {bases['deep']}: the LoRA's layers end before its "
                        "'model.layers.2.self_attn.q_proj', which the adapter has no factors for (the LoRA has "
                        "factors for 2 layers and the base has 3); pass the base it was trained on"), line


def test_the_adapter_folder_beside_a_pth_says_which_layers_it_covers(bases, tmp_path):
    """The trainer writes {stem}/adapter_config.json beside {stem}.pth: its target_modules decide, so a LoRA trained
    on chosen layers only still loads, and one of a shallower model is refused."""
    model = load_minimind(bases["deep"])
    apply_lora(model, rank=4, targets="layers.0.self_attn.q_proj,layers.1.mlp.up_proj")
    for path in (tmp_path / "chosen.pth", tmp_path / "chosen"):
        save_lora(model, path)
    assert len(load_lora(load_minimind(bases["deep"]), tmp_path / "chosen.pth")) == 2
    shallow = lora_of(bases["dense"], tmp_path / "shallow.pth")
    lora_of(bases["dense"], tmp_path / "shallow")
    with pytest.raises(LoRAError, match=r"shallow\.pth: does not fit the base 3-layer: the target_modules of "
                                        r".*shallow/adapter_config\.json select its 'model\.layers\.2\."):
        load_lora(load_minimind(bases["deep"]), shallow, base="3-layer")


def test_a_peft_config_that_does_not_select_its_tensors_is_refused(bases, tmp_path):
    lora = lora_of(bases["dense"], tmp_path / "adapter", targets="q_proj,v_proj,down_proj")
    config = json.loads((lora / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj"]  # another adapter's config beside these weights
    (lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoRAError, match=r"adapter/adapter_model\.safetensors: key 'base_model\.model\.model\.layers\.0\."
                                        r"mlp\.down_proj\.lora_A\.weight': the target_modules of adapter_config\.json "
                                        r"\(\['q_proj', 'v_proj'\]\) do not select 'model\.layers\.0\.mlp\.down_proj'"):
        load_lora(load_minimind(bases["dense"]), lora)


def test_a_peft_config_whose_target_modules_is_no_regex_is_one_line(bases, tmp_path):
    # PEFT full-matches a string target_modules as a regex: a broken one is the config's fault, said in one line
    lora = lora_of(bases["dense"], tmp_path / "adapter", targets="q_proj")
    config = json.loads((lora / "adapter_config.json").read_text())
    config["target_modules"] = r"model\.layers\.(0|1\.self_attn\.q_proj"
    (lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoRAError, match=r"adapter/adapter_config\.json: target_modules '.*' is not a regular "
                                        r"expression \(missing \), unterminated subpattern"):
        load_lora(load_minimind(bases["dense"]), lora)
    # The folder the trainer writes beside a .pth, which only the check of the layers' coverage reads
    lora.rename(tmp_path / "beside")
    pth = lora_of(bases["dense"], tmp_path / "beside.pth", targets="q_proj")
    with pytest.raises(LoRAError, match=r"beside/adapter_config\.json: target_modules '.*' is not a regular"):
        load_lora(load_minimind(bases["dense"]), pth)


def test_a_truncated_adapter_model_bin_is_one_line(bases, tmp_path):
    """PEFT folders from before safetensors hold adapter_model.bin (torch.save): a partly written one is named."""
    lora = lora_of(bases["dense"], tmp_path / "adapter")
    tensors = load_file(lora / "adapter_model.safetensors")
    (lora / "adapter_model.safetensors").unlink()
    torch.save(tensors, lora / "adapter_model.bin")
    assert len(load_lora(load_minimind(bases["dense"]), lora)) == 14
    whole = (lora / "adapter_model.bin").read_bytes()
    (lora / "adapter_model.bin").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LoRAError, match=r"adapter_model\.bin: cannot read it as a LoRA: not a whole PyTorch checkpoint"):
        load_lora(load_minimind(bases["dense"]), lora)


def test_a_dora_magnitude_of_another_size_is_refused(bases, tmp_path):
    model = load_minimind(bases["dense"])
    apply_lora(model, rank=4, targets="q_proj", use_dora=True)
    save_lora(model, tmp_path / "dora")
    tensors = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[key] = tensors[key][:1].clone()  # one value: copying it would fill all 64 rows with it
    save_file(tensors, tmp_path / "dora" / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoRAError, match=r"does not fit the base dense-64: 'model\.layers\.0\.self_attn\.q_proj\."
                                        r"lora_magnitude_vector' has shape \[1\], .* needs \[64\]"):
        load_lora(load_minimind(bases["dense"]), tmp_path / "dora", base="dense-64")


def test_the_cli_prints_one_error_line_and_exits_2(bases, tmp_path):
    lora = lora_of(bases["moe"], tmp_path / "moe_all_linear.pth")
    run = run_cli([python(), str(REPO / "scripts" / "merge_lora.py"), "--from_weight", str(bases["dense"]),
                   "--lora_path", str(lora), "--tokenizer_path", str(tokenizer_dir()), "--save_dir",
                   str(tmp_path / "merged")], timeout=120, env=subprocess_env(), stdin=subprocess.DEVNULL)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.count("error:") == 1 and "the LoRA has expert layers (MoE) and the base is dense" in run.stderr


def test_eval_says_a_lora_does_not_fit_before_it_scores_the_base(bases, tmp_path):
    """eval_lora.py scores the base alone first, minutes on a large data set: a LoRA of another width or layer
    count stops it before the data is scored, run as a script from a folder that is not the repo."""
    narrow = MiniMindForCausalLM(tiny_config(hidden_size=32))
    apply_lora(narrow, rank=4, targets="q_proj")
    save_lora(narrow, tmp_path / "narrow.pth")
    deep = lora_of(bases["deep"], tmp_path / "deep.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 4)
    for lora, why in ((tmp_path / "narrow.pth", "has shape [4, 32]"), (deep, "the LoRA has layer 2 and the base has 2")):
        run = run_cli([python(), str(REPO / "scripts" / "eval_lora.py"), "--from_weight", str(bases["dense"]),
                       "--tokenizer_path", str(tokenizer_dir()), "--lora_path", str(lora), "--data_path", str(data),
                       "--device", "cpu", "--n_prompts", "0"], timeout=120, cwd=tmp_path, env=subprocess_env(),
                      stdin=subprocess.DEVNULL)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith(f"error: {lora}: does not fit the base"), run.stderr
        assert why in run.stderr, run.stderr
        assert "samples scored" not in run.stdout and "loss" not in run.stdout, run.stdout


@pytest.mark.parametrize("gen", ["minimind2_dense", "minimind2_moe", "minimind3_dense", "minimind3_moe"])
def test_minimind_lora_files_load_on_their_own_bases(gen, tmp_path):
    d = FIXTURES / gen
    if not (d / "lora_rank4.pth").is_file():
        pytest.skip(f"fixtures not found at {FIXTURES}")
    moe = "_moe" if gen.endswith("moe") else ""
    named = tmp_path / f"lora_medical_64{moe}.pth"  # as MiniMind's trainer names them
    named.write_bytes((d / "lora_rank4.pth").read_bytes())
    for path in (d / "lora_rank4.pth", named):
        model = load_minimind(d / "weights.pth")
        assert len(load_lora(model, path)) == 4
        with torch.no_grad():
            out = model(torch.load(d / "vectors.pt")["input_ids"]).logits
        assert (out - torch.load(d / "vectors.pt")["lora_logits"]).abs().max() <= 1e-4
