"""train_lora.py's LoRA flags give the model the Python API builds; trainable tensors are chosen by module type."""

import subprocess

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from model.model_lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    load_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
)
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
from trainer.train_lora import main

IDS = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def world(tmp_path):
    """A tiny base .pth and 8 conversations."""
    tokenizer_dir()
    return tmp_path, save_tiny_minimind(tmp_path / "full_sft_64.pth"), write_chat_data(tmp_path / "data.jsonl", 8)


def layer_plan(model: nn.Module) -> dict[str, tuple]:
    return {n: (m.rank, m.alpha, m.scale, m.use_rslora) for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def test_patterns_and_rslora_from_the_cli_build_the_api_model(world):
    tmp, weight, data = world
    argv = lora_args(tmp, weight, data, batch_size=4, max_steps=1, learning_rate=1e-2, lora_alpha=4,
                     lora_rank_pattern="mlp=8,self_attn.q_proj=2", lora_alpha_pattern="mlp=16") + ["--use_rslora"]
    assert run_inprocess(main, argv) == 0
    api = load_minimind(weight)
    apply_lora(api, rank=4, alpha=4, use_rslora=True, rank_pattern={"mlp": 8, "self_attn.q_proj": 2},
               alpha_pattern={"mlp": 16})
    plan = layer_plan(api)
    assert plan["model.layers.0.mlp.up_proj"] == (8, 16, 16 / 8 ** 0.5, True)
    assert plan["model.layers.1.self_attn.q_proj"][:2] == (2, 4)
    assert plan["model.layers.1.self_attn.k_proj"][:2] == (4, 4)

    cli = load_minimind(weight)
    load_lora(cli, tmp / "out" / "lora_identity_64")  # the PEFT directory the run wrote
    assert layer_plan(cli) == plan
    trained = torch.load(tmp / "out" / "lora_identity_64_resume.pth", weights_only=False)["trainable"]
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in lora_state_dict(api).items()}
    load_lora_state_dict(api, trained)
    with torch.no_grad():
        torch.testing.assert_close(cli.eval()(IDS).logits, api.eval()(IDS).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(load_minimind(weight)(IDS).logits, api(IDS).logits, atol=1e-4)  # it trained


def test_bad_pattern_flags_exit_2_with_the_fix(world, capsys):
    tmp, weight, data = world
    assert run_inprocess(main, lora_args(tmp, weight, data, lora_rank_pattern="mlp")) == 2
    assert "mlp=32,self_attn=8" in capsys.readouterr().err
    assert run_inprocess(main, lora_args(tmp, weight, data, lora_targets="q_proj", lora_rank_pattern="mlp=8")) == 2
    err = capsys.readouterr().err
    assert "rank_pattern key 'mlp' matches none of the targeted layers" in err and "Traceback" not in err
    assert run_inprocess(main, lora_args(tmp, weight, data, lora_rank_pattern="mlp=-4")) == 2
    assert "--lora_rank_pattern mlp=-4: a positive whole number is needed" in capsys.readouterr().err
    # nan and inf would train nothing and save nan factors (B is saved times alpha / r) over a good run's files
    for flag, value, needle in (("lora_alpha", "nan", "--lora_alpha must be a positive number (got nan)"),
                                ("lora_alpha", "inf", "--lora_alpha must be a positive number (got inf)"),
                                ("lora_alpha_pattern", "mlp=nan", "--lora_alpha_pattern mlp=nan: a positive number"),
                                ("lora_rank_pattern", "mlp=inf", "--lora_rank_pattern mlp=inf: a positive whole"),
                                ("lora_dropout", "1", "--lora_dropout must be at least 0 and below 1")):
        assert run_inprocess(main, lora_args(tmp, weight, data, **{flag: value})) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert not (tmp / "out").exists()
    model = MiniMindForCausalLM(tiny_config())
    for kwargs in (dict(alpha=float("nan")), dict(alpha=float("inf")), dict(rank_pattern={"mlp": float("nan")})):
        with pytest.raises(LoRAError, match="LoRA"):
            apply_lora(model, rank=4, **kwargs)


class _Gated(nn.Module):
    """A base with its own parameter whose name starts with "lora_" (it is not LoRA and must stay frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.lora_gate = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.lora_gate


def test_trainable_tensors_are_chosen_by_module_type():
    model = _Gated()
    apply_lora(model, rank=2)
    assert not model.lora_gate.requires_grad
    assert [id(p) for p in lora_parameters(model)] == [id(model.proj.lora_A), id(model.proj.lora_B)]
    assert list(lora_state_dict(model)) == ["proj.lora_A", "proj.lora_B"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["proj.lora_A", "proj.lora_B"]


def test_gpt2_conv1d_base_is_refused_with_what_is_supported():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    for targets in (None, "c_attn"):
        with pytest.raises(LoRAError, match=r"\(c_attn, c_fc, c_proj\) are Conv1D, not nn\.Linear.*Qwen, Llama"):
            apply_lora(model, targets=targets)
    assert not lora_parameters(model)


def test_wandb_that_cannot_start_a_run_stops_before_training_with_the_fix(world, tmp_path):
    """No login (a fresh HOME, no API key, online mode): one line and exit 2, not wandb's traceback."""
    pytest.importorskip("wandb")
    tmp, weight, data = world
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in subprocess_env(HOME=str(home), WANDB_MODE="online", WANDB_DIR=str(tmp_path),
                                           WANDB_CONFIG_DIR=str(home / ".config" / "wandb")).items()
           if k not in ("WANDB_API_KEY", "WANDB_ANONYMOUS")}
    cmd = [python(), str(REPO / "trainer" / "train_lora.py"), *lora_args(tmp, weight, data, max_steps=1),
           "--use_wandb"]
    run = run_cli(cmd, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert "error: --use_wandb: wandb could not start a run (" in run.stderr
    assert "run `wandb login`, set WANDB_MODE=offline to log to files, or leave out --use_wandb" in run.stderr
    assert not (tmp / "out" / "lora_identity_64.pth").exists()
