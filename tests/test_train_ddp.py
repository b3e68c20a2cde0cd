"""Two gloo ranks under a real torchrun give the same step as one process with the whole batch."""

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_inprocess,
    save_tiny_minimind,
    tokenizer_dir,
    write_chat_data,
)
from trainer.train_lora import main


@pytest.mark.slow
def test_two_ranks_batch_4_equal_one_process_batch_8(tmp_path, capsys):
    tokenizer_dir()
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    # 9 samples: step 1 takes 8 (4 per rank), step 2 takes the last one, so rank 1 runs a dead
    # (all-ignored) sample to keep DDP's all-reduce in step.
    data = write_chat_data(tmp_path / "data.jsonl", 9)
    flags = dict(epochs=1, learning_rate=1e-2, lora_dropout=0.0)

    assert run_inprocess(main, lora_args(tmp_path, weight, data, save_dir=tmp_path / "one", batch_size=8, **flags)) == 0
    cmd = [python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "trainer" / "train_lora.py"),
           *lora_args(tmp_path, weight, data, save_dir=tmp_path / "two", batch_size=4, **flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout
    assert proc.stdout.count("step 1/2 | epoch 1") == 1  # only rank 0 logs

    one = load_file(tmp_path / "one" / "lora_identity_64" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "lora_identity_64" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    # Adam is blind to a constant gradient factor (e.g. a missing ×world_size); the logged global loss and
    # the pre-clip gradient norm are not.
    h1, h2 = (torch.load(tmp_path / d / "lora_identity_64_resume.pth", weights_only=False)["state"]["history"]
              for d in ("one", "two"))
    for name in ("train", "grad_norm"):
        assert [s for s, _ in h2[name]] == [1, 2]
        for (_, x), (_, y) in zip(h1[name], h2[name]):
            assert y == pytest.approx(x, rel=1e-5)

    # The 2-rank run's resume file continues on 1 process: same step and epoch, the next epoch planned for
    # the new world size (9 samples / global batch 8 -> 2 steps again), RNG re-seeded, and said so.
    argv = lora_args(tmp_path, weight, data, save_dir=tmp_path / "two", batch_size=8, **{**flags, "epochs": 2})
    capsys.readouterr()
    assert run_inprocess(main, argv + ["--from_resume", "1"]) == 0
    assert "was written by 2 process(es), this run has 1" in capsys.readouterr().out
    state = torch.load(tmp_path / "two" / "lora_identity_64_resume.pth", weights_only=False)["state"]
    assert state["step"] == 4 and state["epoch"] == 2 and state["world_size"] == 1
    assert [s for s, _ in state["history"]["train"]] == [1, 2, 3, 4]
