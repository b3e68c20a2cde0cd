"""eval_lora.py: its loss is the float64 cross-entropy of the supervised tokens; base and LoRA both scored."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from dataset.chat_render import render_conversation
from dataset.records import read_conversations
from model.model_lora import apply_lora, load_lora, lora_parameters, save_lora
from scripts.eval_lora import DEFAULT_DATA, evaluate, main, parse_args, read_samples, score
from tests.train_utils import fill_random
from trainer.base_model import load_base
from trainer.logger import shown_path

TEMPLATES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "templates"
N = 6  # samples: enough for single- and multi-turn conversations, few enough for 2 CPU cores


@pytest.fixture(scope="module")
def demo():
    base = load_base(None, "unused", torch.float32)
    return base.model.eval(), base.tokenizer


@torch.no_grad()
def float64_losses(model: torch.nn.Module, tokenizer: object, n: int) -> list[tuple[float, int]]:
    """The reference: each conversation rendered by the dataset code, log-softmax in float64, mean over its mask."""
    model64 = copy.deepcopy(model).double()
    conversations, _ = read_conversations(DEFAULT_DATA)
    out = []
    for conv in conversations[:n]:
        ids, mask = render_conversation(tokenizer, conv.messages, tools=conv.tools)
        logp = torch.log_softmax(model64(torch.tensor([ids])).logits[0, :-1], dim=-1)
        picked = [-float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1) if mask[t + 1]]
        out.append((sum(picked) / len(picked), len(picked)))
    return out


def with_random_lora(model: torch.nn.Module) -> torch.nn.Module:
    tuned = copy.deepcopy(model)
    apply_lora(tuned, rank=4, alpha=8)
    fill_random(lora_parameters(tuned), seed=0, scale=0.05)
    return tuned.eval()


def test_loss_equals_float64_recomputation(demo):
    model, tokenizer = demo
    samples, empty = read_samples(DEFAULT_DATA, tokenizer, 512)
    assert empty == 0
    result = score(model, samples[:N])
    reference = float64_losses(model, tokenizer, N)
    for row, (loss, n) in zip(result["samples"], reference, strict=True):
        assert row["tokens"] == n
        assert row["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert row["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    # The total weights every supervised token equally (not every sample).
    total = sum(loss * n for loss, n in reference) / sum(n for _, n in reference)
    assert result["loss"] == pytest.approx(total, rel=1e-5)
    assert result["tokens"] == sum(n for _, n in reference)


def test_cli_scores_base_and_lora(demo, tmp_path, capsys):
    model, tokenizer = demo
    tuned = with_random_lora(model)
    save_lora(tuned, tmp_path / "lora.pth")
    report = evaluate(parse_args(["--lora_path", str(tmp_path / "lora.pth"), "--max_samples", "3",
                                  "--n_prompts", "1", "--max_new_tokens", "4", "--device", "cpu",
                                  "--json", str(tmp_path / "eval.json")]))
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    base_ref = float64_losses(model, tokenizer, 3)
    # save_lora writes fp16 factors: the reference LoRA is the one read back from the file
    lora_ref = float64_losses(load_lora_copy(model, tmp_path / "lora.pth"), tokenizer, 3)
    for i, row in enumerate(report["samples"]):
        assert row["base_loss"] == pytest.approx(base_ref[i][0], rel=1e-5, abs=1e-6)
        assert row["lora_loss"] == pytest.approx(lora_ref[i][0], rel=1e-5, abs=1e-6)
        assert row["base_loss"] != pytest.approx(row["lora_loss"], rel=1e-3)
        assert f"{row['line']:>5} {row['tokens']:>6} {row['base_loss']:>10.4f}" in out
    assert set(report["generations"][0]) == {"prompt", "reference", "base", "lora"}
    assert f"user: {report['generations'][0]['prompt']}\n" in out


def test_a_lora_is_scored_with_the_chat_template_it_was_trained_with(demo, tmp_path, capsys):
    """The trainer saves --chat_template in the LoRA's folder; eval renders with it (here Qwen2.5's, whose default
    system prompt changes every sample's context), and --chat_template picks one by hand."""
    model, tokenizer = demo
    template = (TEMPLATES / "qwen25.jinja").read_text()
    save_lora(with_random_lora(model), tmp_path / "lora.pth")
    save_lora(with_random_lora(model), tmp_path / "lora")  # the folder the trainer writes beside the .pth
    (tmp_path / "lora" / "chat_template.jinja").write_text(template)
    qwen = copy.deepcopy(tokenizer)
    qwen.chat_template = template
    expected = float64_losses(model, qwen, 2)
    assert expected[0][0] != pytest.approx(float64_losses(model, tokenizer, 1)[0][0], rel=1e-4)
    for lora in ("lora.pth", "lora"):
        report = evaluate(parse_args(["--lora_path", str(tmp_path / lora), "--max_samples", "2", "--n_prompts", "0",
                                      "--device", "cpu"]))
        assert f"chat template: {shown_path(tmp_path / 'lora' / 'chat_template.jinja')}" in capsys.readouterr().out
        for row, (loss, n) in zip(report["samples"], expected, strict=True):
            assert row["tokens"] == n and row["base_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    (tmp_path / "qwen25.jinja").write_text(template)
    report = evaluate(parse_args(["--chat_template", str(tmp_path / "qwen25.jinja"), "--max_samples", "1",
                                  "--n_prompts", "0", "--device", "cpu"]))
    assert report["samples"][0]["base_loss"] == pytest.approx(expected[0][0], rel=1e-5, abs=1e-6)


def load_lora_copy(model: torch.nn.Module, path: object) -> torch.nn.Module:
    tuned = copy.deepcopy(model)
    load_lora(tuned, path)
    return tuned.eval()


def test_bad_flags_exit_2(tmp_path, capsys):
    for argv in (["--max_new_tokens", "0"], ["--top_p", "0"], ["--repetition_penalty", "0"], ["--n_prompts", "-1"],
                 ["--json", str(tmp_path)], ["--device", "gpu"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert argv[0] in err and "Traceback" not in err, err


def test_outputs_and_data_it_cannot_use_stop_before_scoring(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for argv, needle in ((["--json", str(tmp_path / "file" / "eval.json")],
                          f"--json {tmp_path / 'file' / 'eval.json'}: cannot make the folder {tmp_path / 'file'}"),
                         (["--data_path", str(tmp_path)], f"{tmp_path} is a folder; pass the .jsonl file in it")):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--device", "cpu", "--n_prompts", "0"])
        assert exit_info.value.code == 2
        out, err = capsys.readouterr()
        assert needle in err and "samples scored" not in out, err
