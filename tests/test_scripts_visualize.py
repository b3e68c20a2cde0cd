"""visualize_lora.py: the ΔW statistics are the real ones, and the PNGs exist and are not blank."""

import matplotlib.image as mpimg
import pytest
import torch

from model.model_lora import apply_lora, lora_parameters, read_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts.visualize_lora import (
    delta_singular_values,
    delta_table,
    main,
    plot_lora,
    read_history,
    read_runs,
    run_stems,
)
from trainer.checkpoint import TrainState, save_resume, write_json


def tiny_lora_model(alpha: float) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    cfg = MiniMindConfig(
        generation=3,
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = MiniMindForCausalLM(cfg).eval()
    apply_lora(model, rank=4, alpha=alpha, targets="q_proj,v_proj,down_proj")
    with torch.no_grad():
        for p in lora_parameters(model):  # B is 0 after init: give every factor real values
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def assert_real_plot(png) -> None:
    img = mpimg.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 200
    # A blank (all-white) figure has zero variance; a plot with a heatmap or lines has plenty.
    assert img[..., :3].std() > 0.05


def test_singular_values_match_dense_svd():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 48, generator=g), torch.randn(80, 5, generator=g)
    expected = torch.linalg.svdvals(0.75 * B.double() @ A.double())
    torch.testing.assert_close(delta_singular_values(A, B, 0.75), expected[:5], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", ["pth", "peft"])
def test_table_holds_the_model_delta_w(tmp_path, fmt):
    # alpha 8 on rank 4 gives scale 2: the PEFT file keeps scale in its config, the .pth folds it into B.
    model = tiny_lora_model(alpha=8.0)
    path = tmp_path / ("lora.pth" if fmt == "pth" else "lora_peft")
    save_lora(model, path)
    table = delta_table(read_lora(path))
    assert sorted(table) == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    for layer in range(3):
        for kind in table:
            module = model.get_submodule(f"model.layers.{layer}.{kind}")
            dense = module.delta_weight(torch.float64)
            tol = 2e-3 if fmt == "pth" else 1e-9  # the .pth stores fp16 factors
            frob = table[kind][layer].pow(2).sum().sqrt()
            torch.testing.assert_close(frob, torch.linalg.matrix_norm(dense), rtol=tol, atol=0)
            torch.testing.assert_close(
                table[kind][layer], torch.linalg.svdvals(dense)[:4], rtol=tol, atol=1e-6
            )


def test_plots_are_written_and_not_blank(tmp_path):
    model = tiny_lora_model(alpha=4.0)
    save_lora(model, tmp_path / "lora_demo_64.pth")
    pngs = plot_lora(tmp_path / "lora_demo_64.pth", tmp_path / "plots")
    assert [p.name for p in pngs] == ["lora_demo_64_delta_norms.png", "lora_demo_64_singular_values.png"]
    for png in pngs:
        assert_real_plot(png)


def test_cli_reports_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--lora_path", str(tmp_path / "nope.pth"), "--out_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no such LoRA file" in capsys.readouterr().err


def write_run(save_dir, name: str, rank: int, decay: float) -> None:
    """The files trainer/train_lora.py leaves for a run, written with the trainer's own writers."""
    history = {
        "train": [(s, 5.0 * decay**s) for s in range(1, 41)],
        "val": [(20, 5.0 * decay**20), (40, 1.0)],
        "grad_norm": [],
    }
    state = TrainState(step=40, history=history)
    config = {"args": {"lora_rank": rank, "learning_rate": 1e-4}, "step": 40}
    stem = save_dir / name
    save_resume(
        stem.with_name(name + "_resume.pth"),
        {},
        torch.optim.SGD([torch.zeros(1, requires_grad=True)]),
        None,
        state,
        [],
        config,
    )
    write_json(stem.with_name(name + ".json"), config)
    torch.save({}, stem.with_name(name + ".pth"))


def test_loss_curves_of_several_runs(tmp_path, capsys):
    write_run(tmp_path, "lora_r4_64", 4, 0.95)
    write_run(tmp_path, "lora_r8_64", 8, 0.9)
    assert run_stems(tmp_path) == [tmp_path / "lora_r4_64", tmp_path / "lora_r8_64"]
    assert run_stems(tmp_path / "lora_r8_64.pth") == [tmp_path / "lora_r8_64"]
    label, history = read_history(tmp_path / "lora_r8_64")
    assert label == "lora_r8_64 (r=8, lr=0.0001)"
    assert history["train"][0] == (1, 5.0 * 0.9) and history["val"][-1] == (40, 1.0)
    main(["--runs", str(tmp_path), "--out_dir", str(tmp_path / "plots")])
    assert "(2 runs)" in capsys.readouterr().out
    assert_real_plot(tmp_path / "plots" / "loss_curves.png")


def test_runs_of_one_name_in_two_folders_get_their_folder_in_the_label(tmp_path):
    for folder, decay in (("first", 0.95), ("second", 0.9)):
        (tmp_path / folder).mkdir()
        write_run(tmp_path / folder, "lora_identity_64", 4, decay)
    write_run(tmp_path / "second", "lora_other_64", 8, 0.9)
    stems = run_stems(tmp_path / "first") + run_stems(tmp_path / "second")
    assert [label for label, _ in read_runs(stems)] == [
        "first/lora_identity_64 (r=4, lr=0.0001)", "second/lora_identity_64 (r=4, lr=0.0001)",
        "lora_other_64 (r=8, lr=0.0001)"]


def test_runs_without_history_are_reported(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--runs", str(tmp_path), "--out_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no training run" in capsys.readouterr().err


def test_bad_values_and_damaged_configs_exit_2(tmp_path, capsys):
    write_run(tmp_path, "lora_r4_64", 4, 0.95)
    (tmp_path / "file").write_text("")
    (tmp_path / "bad_64.json").write_text("{bad")
    for argv, needle in (
        (["--runs", str(tmp_path / "lora_r4_64.pth"), "--top", "0"], "--top must be at least 1"),
        (["--runs", str(tmp_path / "lora_r4_64.pth"), "--out_dir", str(tmp_path / "file")], "cannot make the folder"),
        (["--runs", str(tmp_path / "bad_64.json"), "--out_dir", str(tmp_path)],
         f"{tmp_path / 'bad_64.json'}: cannot be read as the run's JSON config"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
