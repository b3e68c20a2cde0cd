"""`--from_resume 1` continues a run that MiniMind's own trainer checkpointed into `checkpoints/` beside `out/`."""

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from model.model_minimind import MiniMindForCausalLM
from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    run_inprocess,
    save_tiny_minimind,
    subprocess_env,
    tiny_config,
    write_chat_data,
)
from trainer import full_training, train_full_sft, train_lora
from trainer.schedule import lr_at

LR = 5e-3


class MiniMindLoRA(nn.Module):
    """MiniMind's LoRA module as its apply_lora attaches it to a square nn.Linear: child `lora`, Linear A and B."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        self.A.weight.data.normal_(mean=0.0, std=0.02)
        self.B.weight.data.zero_()


def minimind_lora_run(weight: Path, rank: int = 4, updates: int = 3) -> tuple[nn.Module, torch.optim.AdamW]:
    """What MiniMind's train_lora.py holds after `updates` optimizer steps: this repo's MiniMind model loaded from
    `weight` with MiniMind's LoRA on each square nn.Linear, and AdamW (MiniMind's defaults) over the parameters whose
    name holds 'lora', in named_parameters order; random gradients give every moment its own values."""
    torch.manual_seed(7)
    model = MiniMindForCausalLM(tiny_config())
    model.load_state_dict(torch.load(weight, weights_only=True))
    for module in list(model.modules()):
        if isinstance(module, nn.Linear) and module.weight.shape[0] == module.weight.shape[1]:
            module.lora = MiniMindLoRA(module.in_features, module.out_features, rank)
    lora = [p for name, p in model.named_parameters() if "lora" in name]
    optimizer = torch.optim.AdamW(lora, lr=LR)
    for _ in range(updates):
        for p in lora:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return model, optimizer


def lm_checkpoint(save_dir: Path, weight: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                  step: int, world_size: int = 1, wandb_id: str | None = None) -> Path:
    """MiniMind's trainer_utils.lm_checkpoint in save mode: the fp16 state dict as `{weight}_{hidden}.pth` and the
    resume file `{weight}_{hidden}_resume.pth` in `save_dir` (its trainers pass ../checkpoints)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{weight}_{model.config.hidden_size}{'_moe' if model.config.use_moe else ''}"
    state_dict = {k: v.half().cpu() for k, v in model.state_dict().items()}
    torch.save(state_dict, save_dir / f"{stem}.pth")
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # MiniMind's on a CPU / with bfloat16: disabled
    resume = {"model": state_dict, "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
              "world_size": world_size, "wandb_id": wandb_id, "scaler": scaler.state_dict()}
    path = save_dir / f"{stem}_resume.pth"
    torch.save(resume, path)
    return path


@pytest.fixture
def tree(tmp_path):
    """MiniMind's layout: out/ (the base, this repo's save dir) and checkpoints/ (MiniMind's resume file) side by
    side. MiniMind stopped at epoch 1, micro-batch 5 (batch 2, 2 micro-batches per optimizer step, 24 samples)."""
    weight = save_tiny_minimind(tmp_path / "out" / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 24)
    model, optimizer = minimind_lora_run(weight)
    path = lm_checkpoint(tmp_path / "checkpoints", "lora_identity", model, optimizer, epoch=0, step=5)
    flags = lora_args(tmp_path, weight, data, batch_size=2, accumulation_steps=2, epochs=2, learning_rate=LR,
                      warmup_iters=0, lora_targets="square")
    return tmp_path, path, model, flags


def test_minimind_resume_file_is_continued_with_its_weights_moments_step_and_lr(tree, monkeypatch, capsys):
    tmp, path, theirs, flags = tree
    before = path.read_bytes()
    seen = {}
    real_step = train_lora.train_step

    def first_step(module, *args, **kwargs):
        """The weights, AdamW state and lr that the first step after the resume starts from."""
        if not seen:
            optimizer, params, lr = args[3], args[5], args[6]
            names = {id(p): n for n, p in module.model.named_parameters()}
            seen.update(names=[names[id(p)] for p in params], weights=[p.detach().clone() for p in params],
                        adam=optimizer.state_dict()["state"], lr=lr)
            seen["adam"] = {i: {k: v.clone() for k, v in s.items()} for i, s in seen["adam"].items()}
        return real_step(module, *args, **kwargs)

    monkeypatch.setattr(train_lora, "train_step", first_step)
    assert run_inprocess(train_lora.main, flags + ["--from_resume", "1"]) == 0
    out = capsys.readouterr().out

    # 24 samples, 2 x 2 per optimizer step: 6 steps per epoch. MiniMind's 5 micro-batches are 2 optimizer steps
    # (its 5th never reached the weights), 8 samples; 2 + 4 left in this epoch + 6 in the next = 12 steps.
    assert f"note: continuing MiniMind's run from {path} (epoch 1, micro-batch 5) at step 2, epoch 1, after 8 " in out
    assert re.search(r"^step 3/12 \| epoch 1 \|", out, re.M), out
    assert seen["lr"] == lr_at(2, 12, LR, 0)

    file = torch.load(path, weights_only=False)
    their_order = [n for n, _ in theirs.named_parameters() if "lora" in n]  # MiniMind's optimizer indices
    assert len(seen["names"]) == len(their_order) == 8
    for i, (name, value) in enumerate(zip(seen["names"], seen["weights"])):
        key = name.replace(".lora_A", ".lora.A.weight").replace(".lora_B", ".lora.B.weight")
        assert torch.equal(value, file["model"][key].float()), key  # fp16 weights, as stored
        moments = file["optimizer"]["state"][their_order.index(key)]
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(seen["adam"][i][k].cpu().reshape(moments[k].shape), moments[k]), (key, k)
    assert path.read_bytes() == before  # MiniMind's file is read, never written
    assert (tmp / "out" / "lora_identity_64_resume.pth").is_file()


def test_a_minimind_lora_run_continues_on_a_4bit_base(tree, capsys):
    """--load_in_4bit holds the frozen base in NF4: its weights are no plain tensors then, yet of the shapes that
    MiniMind's fp16 copy of the base has; only the LoRA and its moments are taken from the file."""
    tmp, path, _, flags = tree
    assert run_inprocess(train_lora.main, flags + ["--from_resume", "1", "--load_in_4bit", "1", "--max_steps", "3"]) == 0
    assert f"note: continuing MiniMind's run from {path} (epoch 1, micro-batch 5) at step 2" in capsys.readouterr().out
    resumed = torch.load(tmp / "out" / "lora_identity_64_resume.pth", weights_only=False)
    assert resumed["state"]["step"] == 3


def test_running_out_of_memory_while_reading_minimind_s_file_is_not_called_a_damaged_file(tree, monkeypatch, capsys):
    # "move it away to start fresh" would lose a good file: only a file torch cannot parse is damaged
    tmp, path, _, flags = tree

    real_load = torch.load

    def no_memory(file, *args, **kwargs):
        if Path(file) == path:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", no_memory)
    assert run_inprocess(train_lora.main, flags + ["--from_resume", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: out of memory (DefaultCPUAllocator" in err and "move it away" not in err, err


def test_minimind_s_checkpoints_folder_is_found_from_where_it_ran_with_another_save_dir(tree, monkeypatch, capsys):
    """MiniMind writes ../checkpoints from its trainer/ whatever its --save_dir: its command with --save_dir on
    another disk, run from there again, continues the run."""
    tmp, path, _, flags = tree
    moved = tmp / "minimind" / "checkpoints" / path.name
    moved.parent.mkdir(parents=True)
    path.rename(moved)
    (tmp / "minimind" / "trainer").mkdir()
    monkeypatch.chdir(tmp / "minimind" / "trainer")
    assert run_inprocess(train_lora.main, flags + ["--from_resume", "1", "--max_steps", "3"]) == 0
    assert f"note: continuing MiniMind's run from {moved} (epoch 1, micro-batch 5) at step 2" in capsys.readouterr().out


def _cli(tmp: Path, flags: list[str]) -> object:
    """The real script from a folder that is neither the repo nor the run's."""
    cwd = tmp / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return run_cli([python(), str(REPO / "trainer" / "train_lora.py"), *flags, "--from_resume", "1"], timeout=240,
                   cwd=cwd, env=subprocess_env())


@pytest.mark.parametrize("change, error", [
    (["--lora_rank", "8"], "its LoRA rank is 4, this run's 8; pass --lora_rank 4"),
    (["--lora_targets", "q_proj,k_proj,v_proj,o_proj"], "its LoRA adapts o_proj, q_proj (4 layers), this run's "
                                                         "8 layers; pass --lora_targets square"),
    (["--lora_alpha", "8"], "MiniMind's LoRA runs at scale 1 (alpha = rank), this run at 2; leave out --lora_alpha"),
])
def test_a_minimind_resume_file_that_does_not_fit_is_refused(tree, change, error):
    tmp, path, _, flags = tree
    run = _cli(tmp, flags + change)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"error: {path} (MiniMind's resume file) does not fit this run: {error}" in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr


def test_a_minimind_resume_file_of_other_processes_or_a_full_run_is_refused(tree):
    tmp, path, theirs, flags = tree
    lm_checkpoint(path.parent, "lora_identity", theirs, torch.optim.AdamW(
        [p for n, p in theirs.named_parameters() if "lora" in n]), epoch=0, step=4, world_size=2)
    run = _cli(tmp, flags)
    assert run.returncode == 2, run.stdout + run.stderr
    assert ("does not fit this run: MiniMind ran it on 2 process(es), this run has 1; run it on 2 (torchrun "
            "--nproc_per_node 2)") in run.stderr

    full = MiniMindForCausalLM(tiny_config())
    lm_checkpoint(path.parent, "lora_identity", full, torch.optim.AdamW(full.parameters()), epoch=0, step=4)
    run = _cli(tmp, flags)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "does not fit this run: it holds a full training run (no LoRA weights)" in run.stderr


def test_this_repos_own_resume_file_is_preferred_to_minimind_s(tree):
    tmp, path, _, flags = tree
    assert _cli(tmp, flags + ["--max_steps", "3"]).returncode == 0  # this repo's file now exists: at step 3
    before = path.read_bytes()
    run = _cli(tmp, flags + ["--max_steps", "4"])
    assert run.returncode == 0, run.stdout + run.stderr
    own = tmp / "out" / "lora_identity_64_resume.pth"
    assert f"resuming from {own}: step 3, epoch 1" in run.stdout
    assert f"note: {path} (MiniMind's resume file) is not used: this --save_dir holds this repo's own" in run.stdout
    assert "continuing MiniMind's run" not in run.stdout
    assert path.read_bytes() == before


def test_a_full_sft_run_of_minimind_continues_with_its_weights_and_moments(tmp_path, monkeypatch, capsys):
    weight = save_tiny_minimind(tmp_path / "out" / "pretrain_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 8)
    torch.manual_seed(3)
    theirs = MiniMindForCausalLM(tiny_config())  # MiniMind's full SFT: AdamW over model.parameters()
    theirs.load_state_dict(torch.load(weight, weights_only=True))
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=LR)
    for p in theirs.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    path = lm_checkpoint(tmp_path / "checkpoints", "full_sft", theirs, optimizer, epoch=0, step=1)
    seen = {}
    real_step = full_training.train_step

    def first_step(module, *args, **kwargs):
        if not seen:
            names = {id(p): n for n, p in module.model.named_parameters()}
            seen.update(names=[names[id(p)] for p in args[5]], weights=[p.detach().clone() for p in args[5]],
                        adam=copy.deepcopy(args[3].state_dict()["state"]))
        return real_step(module, *args, **kwargs)

    monkeypatch.setattr(full_training, "train_step", first_step)
    flags = lora_args(tmp_path, weight, data, batch_size=2, epochs=1, learning_rate=LR)
    flags = flags[:flags.index("--lora_rank")] + flags[flags.index("--lora_rank") + 2:]
    assert run_inprocess(train_full_sft.main, flags + ["--from_resume", "1"]) == 0
    assert f"note: continuing MiniMind's run from {path} (epoch 1, micro-batch 1) at step 1, epoch 1" in \
        capsys.readouterr().out
    file = torch.load(path, weights_only=False)
    their_order = [n for n, _ in theirs.named_parameters()]
    assert sorted(seen["names"]) == sorted(their_order)
    for i, (name, value) in enumerate(zip(seen["names"], seen["weights"])):
        assert torch.equal(value, file["model"][name].float()), name
        moments = file["optimizer"]["state"][their_order.index(name)]
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(seen["adam"][i][k], moments[k]), (name, k)
