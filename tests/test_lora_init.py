"""--init_lora: a new run starts from an existing adapter (.pth or PEFT directory) with its exact weights."""

import json
import re

import pytest
import torch

from tests.train_utils import lora_args, run_inprocess, save_tiny_minimind, tokenizer_dir, write_chat_data
from trainer.train_lora import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base, data, and a 2-step LoRA run on it (rank 4, mlp rank 8, alpha 8, rsLoRA)."""
    tokenizer_dir()
    tmp = tmp_path_factory.mktemp("init_lora")
    weight, data = save_tiny_minimind(tmp / "full_sft_64.pth"), write_chat_data(tmp / "data.jsonl", 8)
    argv = lora_args(tmp, weight, data, save_dir=tmp / "first", batch_size=4, max_steps=2, learning_rate=1e-2,
                     lora_alpha=8, lora_rank_pattern="mlp=8", lora_targets="q_proj,v_proj,up_proj") + ["--use_rslora"]
    assert run_inprocess(main, argv) == 0
    return tmp, weight, data


def _no_rank(argv: list[str]) -> list[str]:
    """lora_args without its --lora_rank (the file gives the rank)."""
    i = argv.index("--lora_rank")
    return argv[:i] + argv[i + 2:]


def _resume(out):
    return torch.load(out / "lora_identity_64_resume.pth", weights_only=False)


def test_init_from_peft_dir_resumes_the_weights_exactly(trained):
    tmp, weight, data = trained
    first = _resume(tmp / "first")
    # lr 0: AdamW leaves the weights alone (decay is lr·wd), so the saved LoRA is the one the run started from.
    argv = _no_rank(lora_args(tmp, weight, data, save_dir=tmp / "peft", batch_size=4, max_steps=1, learning_rate=0,
                              init_lora=tmp / "first" / "lora_identity_64"))
    assert run_inprocess(main, argv) == 0
    second = _resume(tmp / "peft")
    assert second["trainable"].keys() == first["trainable"].keys()
    for key, value in first["trainable"].items():
        assert torch.equal(second["trainable"][key], value), key
    assert second["state"]["step"] == 1  # a new schedule, not the first run's step 2
    assert len(second["optimizer"]["state"]) == len(first["optimizer"]["state"])
    cfg = json.loads((tmp / "peft" / "lora_identity_64" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and len(cfg["rank_pattern"]) == 2


def test_init_from_minimind_pth_keeps_its_function(trained):
    tmp, weight, data = trained
    pth = torch.load(tmp / "first" / "lora_identity_64.pth", weights_only=True)
    for alpha in (None, 16.0):  # a .pth holds no alpha: any alpha continues it, B rescaled to the same update
        out = tmp / f"pth_{alpha}"
        flags = {} if alpha is None else {"lora_alpha": alpha}
        argv = _no_rank(lora_args(tmp, weight, data, save_dir=out, batch_size=4, max_steps=1, learning_rate=0,
                                  init_lora=tmp / "first" / "lora_identity_64.pth", **flags))
        assert run_inprocess(main, argv) == 0
        trainable = _resume(out)["trainable"]
        assert len(trainable) == len(pth)
        for key, value in trainable.items():
            module, ab = key.rsplit(".lora_", 1)
            scale = 1.0 if alpha is None else alpha / value.shape[1 if ab == "B" else 0]
            got = value * scale if ab == "B" else value
            assert torch.equal(got, pth[f"{module}.lora.{ab}.weight"].float()), key


@pytest.mark.parametrize("flags, message", [
    ({"lora_rank": 2}, "--lora_rank 2 contradicts --init_lora .*its layers have rank 4, 8"),
    ({"lora_targets": "q_proj"}, "--lora_targets q_proj contradicts .*selects 2 layers, the file adapts 6"),
    ({"lora_alpha": 4}, "--lora_alpha 4 contradicts .*its alphas are \\[8\\]"),
    ({"lora_rank_pattern": "mlp=4"}, "--lora_rank_pattern contradicts"),
    ({"use_dora": True}, "--use_dora contradicts .*a plain LoRA, not DoRA"),
])
def test_flags_that_contradict_the_file_are_refused(trained, capsys, flags, message):
    tmp, weight, data = trained
    argv = lora_args(tmp, weight, data, save_dir=tmp / "refused", init_lora=tmp / "first" / "lora_identity_64",
                     **flags)
    if "lora_rank" not in flags:
        argv = _no_rank(argv)
    assert run_inprocess(main, argv) == 2
    err = capsys.readouterr().err
    assert "drop the flag" in err and "Traceback" not in err
    assert re.search(message, err), err
