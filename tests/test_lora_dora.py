"""DoRA against PEFT's own DoRA: files both ways, logits and gradients (fp32, 1e-5), merge, the trainer's flag."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from model.model_lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_parameters,
    merge_lora,
    save_lora,
    unmerge_lora,
)
from model.model_minimind import load_minimind
from tests.train_utils import lora_args, run_inprocess, save_tiny_minimind, tokenizer_dir, write_chat_data
from trainer.logger import shown_path
from trainer.train_lora import main

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
TOL = 1e-5


def tiny(kind: str) -> torch.nn.Module:
    """A tiny random Qwen3, or a Llama with biases (DoRA must leave the bias out of the norm and the scaling)."""
    torch.manual_seed(0)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                        mlp_bias=True)).eval()


def randomize(named_params, seed: int = 1) -> None:
    """Non-zero B and a magnitude away from ‖W‖ (a fresh DoRA layer is the base and would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.2 * noise) if "magnitude" in name else noise * 0.1)


def ours_named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_peft_dora_adapter_loads_here(kind, tmp_path):
    theirs = peft.get_peft_model(tiny(kind), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 2}))
    randomize((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    want = logits(theirs)
    assert (want - logits(tiny(kind))).abs().max() > 1e-2
    ours = tiny(kind)
    names = load_lora(ours, tmp_path / "theirs")
    assert len(names) == 8 and all(m.use_dora for m in ours.modules() if isinstance(m, LoRALinear))
    assert (logits(ours) - want).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_our_dora_adapter_loads_in_peft(kind, tmp_path):
    ours = tiny(kind)
    fresh = logits(ours)
    apply_lora(ours, rank=4, alpha=8, use_dora=True, use_rslora=True, rank_pattern={"mlp": 8})
    assert (logits(ours) - fresh).abs().max() <= TOL  # m = ‖W‖ and B = 0: a fresh DoRA model is the base
    randomize(ours_named(ours))
    save_lora(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "ours").eval()
    want = logits(ours)
    assert (want - fresh).abs().max() > 1e-2
    assert (logits(theirs) - want).abs().max() <= TOL
    with pytest.raises(LoRAError, match="no place for DoRA"):
        save_lora(ours, tmp_path / "ours.pth")


def test_dora_gradients_equal_peft(tmp_path):
    """DoRA's norm is detached (paper §4.3, PEFT): the gradients of A, B and m must be PEFT's."""
    theirs = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                target_modules=["q_proj", "o_proj", "gate_proj"]))
    randomize((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = tiny("llama")
    load_lora(ours, tmp_path / "theirs")
    grads = []
    for model in (theirs, ours):
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append({n.replace("base_model.model.", "").replace(".default", "").replace("_vector.weight", "_vector")
                      .replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B"): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[1]) == 3 * 2 * 3
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], g, atol=TOL, rtol=1e-4)


def test_dora_merge_unmerge_and_unload():
    model = tiny("llama")
    apply_lora(model, rank=4, alpha=8, use_dora=True, targets="q_proj,down_proj")
    randomize(ours_named(model))
    before = {n: p.clone() for n, p in model.named_parameters()}
    want = logits(model)
    merge_lora(model)
    assert (logits(model) - want).abs().max() <= TOL
    unmerge_lora(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-5)
    merge_lora(model, unload=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (logits(model) - want).abs().max() <= TOL


def test_use_dora_flag_trains_a_peft_dora_adapter(tmp_path, capsys):
    tokenizer_dir()
    weight, data = save_tiny_minimind(tmp_path / "full_sft_64.pth"), write_chat_data(tmp_path / "data.jsonl", 8)
    argv = lora_args(tmp_path, weight, data, batch_size=4, max_steps=2, learning_rate=1e-2, lora_alpha=8)
    assert run_inprocess(main, argv + ["--use_dora"]) == 0
    out = tmp_path / "out"
    assert not (out / "lora_identity_64.pth").exists()  # MiniMind's layout has no DoRA magnitude
    # as the log shows paths: relative when the run's folder is below the working directory, else absolute (shown_path)
    printed = capsys.readouterr().out
    assert f"done: {shown_path(out / 'lora_identity_64')}/" in printed
    assert "MiniMind's own load_lora" not in printed  # no .pth is written, so no note on how MiniMind reads it
    resume = torch.load(out / "lora_identity_64_resume.pth", weights_only=False)
    assert sum(k.endswith("lora_magnitude_vector") for k in resume["trainable"]) == 14
    ids = torch.randint(3, 6400, (2, 12))
    ours = load_minimind(weight)
    load_lora(ours, out / "lora_identity_64")
    theirs = peft.PeftModel.from_pretrained(load_minimind(weight), str(out / "lora_identity_64")).eval()
    assert (logits(ours.eval(), ids) - logits(theirs, ids)).abs().max() <= TOL
    assert (logits(ours, ids) - logits(load_minimind(weight).eval(), ids)).abs().max() > 1e-4  # it trained
    assert len(lora_parameters(ours)) == 3 * 14

