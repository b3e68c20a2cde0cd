"""scripts/bench/eager_step.py: the trainer's padded eager step, timed per width."""

import json
import math

import torch

from scripts.bench.eager_step import main, padded_batch
from scripts.bench_lora import SHAPES


def test_padded_batches_supervise_only_real_tokens():
    batch, n_tokens = padded_batch(SHAPES["tiny"], 4, 48, torch.Generator().manual_seed(0))
    mask = batch["attention_mask"].flatten()
    assert n_tokens == int(mask.sum()) and batch["attention_mask"][0].all()  # the first row is full
    # Position i predicts token i + 1: both are real tokens, and the target is that token.
    assert mask[batch["sup_index"]].all() and mask[batch["sup_index"] + 1].all()
    assert torch.equal(batch["input_ids"].flatten()[batch["sup_index"] + 1], batch["sup_targets"])


def test_times_each_width_on_a_cpu(tmp_path):
    assert main(["--device", "cpu", "--shape", "tiny", "--widths", "32,48", "--warmup", "1", "--steps", "2",
                 "--json", str(tmp_path / "eager.json")]) == 0
    results = json.loads((tmp_path / "eager.json").read_text())
    assert list(results["widths"]) == ["32", "48"] and results["device"] == "cpu"
    for row in results["widths"].values():
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0 and math.isfinite(row["loss"])
