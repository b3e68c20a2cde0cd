"""Shared pieces of the trainer tests: a tiny MiniMind on disk, tiny chat data, in-process runs."""

import json
import random
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TOKENIZER = FIXTURES / "tokenizers" / "minimind"

QUESTIONS = ["hello", "who", "are", "you", "what", "is", "this", "name", "please", "tell", "me"]
ANSWERS = ["I", "am", "a", "small", "model", "made", "to", "help", "with", "questions", "today"]


def tokenizer_dir() -> Path:
    """MiniMind's real tokenizer from the shared fixtures (skip the test without it)."""
    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"fixtures not found at {TOKENIZER}")
    return TOKENIZER


def tiny_config(**over: object) -> MiniMindConfig:
    """A minimind-3 model small enough for 2 CPU cores, with MiniMind's 6400-token vocabulary."""
    kw = dict(generation=3, vocab_size=6400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    return MiniMindConfig(**{**kw, **over})


def save_tiny_minimind(path: Path, seed: int = 0, **over: object) -> Path:
    """A random tiny MiniMind saved as a plain state-dict .pth (MiniMind's own format)."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny_config(**over))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_chat_data(path: Path, n: int, seed: int = 0, max_words: int = 14) -> Path:
    """n MiniMind-format conversations of clearly different lengths."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(QUESTIONS) for _ in range(rng.randint(1, max_words)))
            a = " ".join(rng.choice(ANSWERS) for _ in range(rng.randint(1, max_words)))
            f.write(json.dumps({"conversations": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}) + "\n")
    return path


def lora_args(tmp: Path, weight: Path, data: Path, **flags: object) -> list[str]:
    """Flags for a tiny CPU LoRA run writing into tmp/out."""
    base = {"from_weight": weight, "save_dir": tmp / "out", "data_path": data, "tokenizer_path": tokenizer_dir(),
            "device": "cpu", "num_workers": 0, "log_interval": 1, "lora_rank": 4, "seed": 1}
    argv = []
    for key, value in {**base, **flags}.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_inprocess(main: object, argv: list[str]) -> int:
    """Run a job's main() exactly as the script's entry point does; return the exit status."""
    from trainer.engine import run_job

    with pytest.raises(SystemExit) as exc:
        run_job(partial(main, argv))
    return exc.value.code


def python() -> str:
    """The interpreter running the tests (for subprocess runs)."""
    return sys.executable
