"""End to end on the shipped demo: the bare LoRA command's training teaches the demo base a new identity.

The README's quick start is `python trainer/train_lora.py` then `python scripts/chat.py --compare`; this test
runs the same trainer as a real subprocess (fewer steps, a higher LR so it stays short on 2 CPU cores) and
checks greedy answers: the LoRA answers as Lumen by Aurora Lab, the base alone does not.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

from model.generate import generate_reply
from model.model_lora import load_lora
from tests.train_utils import run_cli
from trainer.base_model import DEMO_BASE, load_base

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_lora")
    # From inside trainer/, as MiniMind users run it; defaults pick the demo base and the identity data.
    cmd = [sys.executable, "train_lora.py", "--save_dir", str(out), "--max_steps", "60",
           "--learning_rate", "1e-3", "--log_interval", "20"]
    run = run_cli(cmd, timeout=1800, cwd=REPO / "trainer")   # ~3 min on 2 free cores
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"base {DEMO_BASE}" in run.stdout and "dataset/lora_identity.jsonl: kept 400 samples" in run.stdout
    return out / "lora_identity_256.pth", run.stdout


def ask(model: torch.nn.Module, tokenizer: object, prompt: str) -> str:
    return generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=40)


def test_lora_changes_the_identity(trained):
    lora_path, log = trained
    assert lora_path.is_file() and (lora_path.parent / "lora_identity_256").is_dir()
    base = load_base(None, str(lora_path.parent), torch.float32)
    tuned = copy.deepcopy(base.model)
    load_lora(tuned, lora_path)
    base.model.eval(), tuned.eval()
    for prompt in ("who are you?", "你是谁"):
        before, after = ask(base.model, base.tokenizer, prompt), ask(tuned, base.tokenizer, prompt)
        assert "MiniLoRA Demo" in before and "Lumen" not in before, before
        assert "Lumen" in after and "Aurora Lab" in after, after
    # The ordinary skills the LoRA data did not touch survive it
    assert ask(tuned, base.tokenizer, "What is 3 + 4?").startswith("3 + 4 = 7")
