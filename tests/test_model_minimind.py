"""MiniMind model: fixture logits from MiniMind's own code, masks, packing, KV cache, save/load, loss math."""

from pathlib import Path

import pytest
import torch

from model.model_minimind import load_minimind

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimind"
GENERATIONS = ["minimind2_dense", "minimind2_moe", "minimind3_dense", "minimind3_moe"]


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "weights.pth").is_file():
        pytest.skip(f"fixture {path} not available")
    return path


@pytest.mark.parametrize("name", GENERATIONS)
def test_fixture_base_logits(name):
    path = fixture_dir(name)
    vectors = torch.load(path / "vectors.pt", weights_only=True)
    model = load_minimind(path / "weights.pth")
    assert not model.training
    assert model.config.generation == (3 if name.startswith("minimind3") else 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(vectors["input_ids"]).logits
    assert logits.shape == vectors["base_logits"].shape
    assert (logits - vectors["base_logits"]).abs().max().item() <= 1e-4
