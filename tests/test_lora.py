"""LoRA math, targets, merge and files, checked against MiniMind's fixtures and float64 recomputation."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from model.model_lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    find_targets,
    load_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    read_lora,
    save_lora,
    set_lora_fused,
    unmerge_lora,
)
from model.model_minimind import load_minimind
from tests.train_utils import fill_random

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimind"
GENERATIONS = ["minimind2_dense", "minimind2_moe", "minimind3_dense", "minimind3_moe"]


def fixture(gen: str) -> Path:
    if not (FIXTURES / gen / "weights.pth").is_file():
        pytest.skip(f"fixtures not found at {FIXTURES}")
    return FIXTURES / gen


def tiny_qwen(seed: int = 0, tie: bool = False) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie)
    return Qwen3ForCausalLM(cfg).eval()


def randomize_lora(model: nn.Module, seed: int = 1, fp16_exact: bool = False) -> None:
    """Non-zero B (a fresh B is 0, which would hide every scale and key mistake)."""
    fill_random(lora_parameters(model), seed)
    if fp16_exact:  # values fp16 holds exactly, so a fp16 file round trip loses nothing
        with torch.no_grad():
            for p in lora_parameters(model):
                p.copy_(p.half().float())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------- MiniMind's own files

@pytest.mark.parametrize("gen", GENERATIONS)
def test_minimind_lora_file_reproduces_upstream_logits(gen):
    d = fixture(gen)
    vectors = torch.load(d / "vectors.pt")
    model = load_minimind(d / "weights.pth").eval()
    names = load_lora(model, d / "lora_rank4.pth")
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    assert all(m.rank == 4 and m.scale == 1 for m in model.modules() if isinstance(m, LoRALinear))
    out = logits(model, vectors["input_ids"])
    assert (out - vectors["lora_logits"]).abs().max() <= 1e-4
    assert (out - vectors["base_logits"]).abs().max() > 1e-2  # the LoRA really changed something


def test_minimind_file_with_ddp_prefix_and_existing_lora(tmp_path):
    """A `module.`-prefixed file loads; a model that already has LoRA (other alpha) keeps it and matches."""
    d = fixture("minimind2_dense")
    vectors = torch.load(d / "vectors.pt")
    sd = torch.load(d / "lora_rank4.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    model = load_minimind(d / "weights.pth").eval()
    apply_lora(model, rank=4, alpha=32, targets="square")
    load_lora(model, tmp_path / "ddp.pth")
    assert all(m.scale == 8 for m in model.modules() if isinstance(m, LoRALinear))
    assert (logits(model, vectors["input_ids"]) - vectors["lora_logits"]).abs().max() <= 1e-4


def test_targets_default_square_and_names():
    model = load_minimind(fixture("minimind3_moe") / "weights.pth")
    default = find_targets(model)
    assert "lm_head" not in default and not any(n.endswith("mlp.gate") for n in default)  # head, router
    assert len(default) == 2 * (4 + 4 * 3)  # per layer: q,k,v,o + 4 experts × (gate,up,down)
    square = find_targets(model, "square")
    assert square == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    names = find_targets(model, "q_proj, v_proj")
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert find_targets(model, ["experts.1.down_proj"]) == [f"model.layers.{i}.mlp.experts.1.down_proj"
                                                             for i in range(2)]
    with pytest.raises(LoRAError, match="'qproj'"):
        find_targets(model, "qproj")
    with pytest.raises(LoRAError, match="rank_pattern key 'attn'"):
        apply_lora(model, targets="q_proj", rank_pattern={"attn": 8})  # matches no whole component


def test_rank_and_alpha_patterns():
    model = tiny_qwen()
    apply_lora(model, rank=4, alpha=8, rank_pattern={"mlp": 16, "layers.1.self_attn.q_proj": 2},
               alpha_pattern={"down_proj": 2})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert (layers["model.layers.0.self_attn.q_proj"].rank, layers["model.layers.0.self_attn.q_proj"].alpha) == (4, 8)
    assert layers["model.layers.1.self_attn.q_proj"].rank == 2
    assert layers["model.layers.0.mlp.up_proj"].rank == 16 and layers["model.layers.0.mlp.up_proj"].scale == 0.5
    assert layers["model.layers.1.mlp.down_proj"].scale == 2 / 16
    assert layers["model.layers.0.mlp.up_proj"].lora_A.shape == (16, 64)


# ------------------------------------------------------------------------- the layer's math

@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_matches_float64_formula(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True)
    layer = LoRALinear(base, rank=6, alpha=3.0, use_rslora=use_rslora)
    randomize_lora(layer)
    x = torch.randn(3, 5, 24)
    scale = 3.0 / math.sqrt(6) if use_rslora else 3.0 / 6
    d = {k: v.double() for k, v in layer.state_dict().items()}
    want = x.double() @ d["weight"].T + d["bias"] + scale * (x.double() @ d["lora_A"].T @ d["lora_B"].T)
    assert layer.weight is base.weight and set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert (layer(x).double() - want).abs().max() < 1e-5
    assert "rank=6" in repr(layer) and "alpha=3" in repr(layer) and "in_features=24" in repr(layer)


def test_gradients_match_float64_and_only_lora_trains():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=8)
    randomize_lora(layer)
    x, g = torch.randn(10, 16), torch.randn(10, 8)
    (layer(x) * g).sum().backward()
    xd, gd, A, B = x.double(), g.double(), layer.lora_A.double(), layer.lora_B.double()
    # y = s·x Aᵀ Bᵀ  ⇒  dB = s·gᵀ (x Aᵀ),  dA = s·(g B)ᵀ x
    assert (layer.lora_B.grad.double() - 2 * gd.T @ (xd @ A.T)).abs().max() < 1e-5
    assert (layer.lora_A.grad.double() - 2 * (gd @ B).T @ xd).abs().max() < 1e-5
    assert layer.weight.grad is None and layer.bias.grad is None

    model = tiny_qwen()
    apply_lora(model, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    model(IDS, labels=IDS).loss.backward()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert p.grad is not None and p.grad.abs().max() > 0, n  # with B = 0, only B gets a signal
        elif "lora_A" not in n:
            assert p.grad is None, n


def test_fused_training_path_matches_float64():
    """set_lora_fused's autograd Function (merged-weight GEMM, hand-written backward) against float64."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=6, use_rslora=True)
    randomize_lora(layer)
    set_lora_fused(layer)
    assert "fused" in repr(layer)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 8)
    out = layer.train()(x)
    (out * g).sum().backward()
    xd, gd, A, B, W = (t.detach().double() for t in (x, g, layer.lora_A, layer.lora_B, layer.weight))
    s = 6 / 2  # alpha / √r
    assert (out.double() - (xd @ W.T + layer.bias.double() + s * xd @ A.T @ B.T)).abs().max() < 1e-5
    assert (x.grad.double() - gd @ (W + s * B @ A)).abs().max() < 1e-5
    assert (layer.lora_A.grad.double() - s * torch.einsum("bto,or,bti->ri", gd, B, xd)).abs().max() < 1e-5
    assert (layer.lora_B.grad.double() - s * torch.einsum("bto,bti,ri->or", gd, xd, A)).abs().max() < 1e-5
    assert layer.weight.grad is None


def test_fresh_lora_model_equals_base():
    model = tiny_qwen()
    base = logits(model, IDS)
    apply_lora(model, rank=8, alpha=16, dropout=0.1, use_rslora=True)
    model.train()  # dropout on the LoRA input only: with B = 0 even a training-mode pass is the base's
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)


def test_dropout_acts_on_the_lora_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=4, dropout=0.5).train()
    randomize_lora(layer)
    x = torch.randn(6, 16)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, True)  # same seed, same mask
    want = x @ layer.weight.T + layer.bias + dropped @ layer.lora_A.T @ layer.lora_B.T
    assert (out - want).abs().max() < 1e-5
    assert (layer.eval()(x) - (x @ layer.weight.T + layer.bias + x @ layer.lora_A.T @ layer.lora_B.T)).abs().max() < 1e-5


def test_bf16_base_keeps_lora_math_in_fp32():
    torch.manual_seed(0)
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = LoRALinear(base, rank=8, alpha=16)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    randomize_lora(layer)
    x, g = torch.randn(20, 64).to(torch.bfloat16), torch.randn(20, 32)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    want = F.linear(x, base.weight, base.bias).double() + 2 * (x.double() @ layer.lora_A.double().T @ layer.lora_B.double().T)
    assert (out.double() - want).abs().max() <= 2 * (want.abs().max() * 2**-8).item()  # one bf16 rounding
    (out.float() * g).sum().backward()
    # LoRA grads in fp32, computed from the bf16 output grad: bf16 math would be ~1e-2 off, fp32 is ~1e-6.
    gd = g.to(torch.bfloat16).double()
    want_dB = 2 * gd.T @ (x.double() @ layer.lora_A.double().T)
    assert layer.lora_B.grad.dtype == torch.float32
    assert (layer.lora_B.grad.double() - want_dB).abs().max() < 1e-4 * want_dB.abs().max()


# ------------------------------------------------------------------------- merge

def test_merge_unmerge_and_unload():
    model = tiny_qwen()
    apply_lora(model, rank=4, alpha=8, rank_pattern={"mlp": 8})
    randomize_lora(model)
    before = {n: p.clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    unmerged = logits(model, IDS)
    merge_lora(model)
    q = model.model.layers[0].self_attn.q_proj
    assert q.merged
    want = before["model.layers.0.self_attn.q_proj.weight"].double() + 2 * q.lora_B.double() @ q.lora_A.double()
    assert (q.weight.double() - want).abs().max() < 1e-6
    assert (logits(model, IDS) - unmerged).abs().max() <= 1e-5
    saved_B = q.lora_B.detach().clone()
    with torch.no_grad():  # a merged layer skips its LoRA branch: B no longer matters
        q.lora_B.zero_()
        assert (logits(model, IDS) - unmerged).abs().max() <= 1e-5
        q.lora_B.copy_(saved_B)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in before:
            assert (p - before[n]).abs().max() <= 1e-6, n
    assert (logits(model, IDS) - unmerged).abs().max() <= 1e-6

    merge_lora(model, unload=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("lora" in k for k in model.state_dict())
    assert (logits(model, IDS) - unmerged).abs().max() <= 1e-5


def test_merge_into_tied_head_is_refused():
    model = tiny_qwen(tie=True)
    apply_lora(model, rank=4, targets="q_proj,lm_head")
    with pytest.raises(LoRAError, match="lm_head"):
        merge_lora(model)


# ------------------------------------------------------------------------- files

PATTERNED = {"rank": 4, "alpha": 8, "use_rslora": True, "rank_pattern": {"mlp": 16}, "targets": "q_proj,v_proj,up_proj,down_proj"}


def test_pth_round_trip(tmp_path):
    model = tiny_qwen()
    apply_lora(model, **PATTERNED)  # scales 8/√4 = 4 and 8/√16 = 2: powers of two, exact in fp16
    randomize_lora(model, fp16_exact=True)
    want = logits(model, IDS)
    save_lora(model, tmp_path / "lora_64.pth")
    assert not (tmp_path / "lora_64.pth.tmp").exists()
    sd = torch.load(tmp_path / "lora_64.pth")
    up = model.model.layers[0].mlp.up_proj
    assert len(sd) == 2 * 8 and all(v.dtype == torch.float16 for v in sd.values())
    assert torch.equal(sd["model.layers.0.mlp.up_proj.lora.B.weight"].float(), up.lora_B * 2)  # scale folded in
    assert sd["model.layers.0.mlp.up_proj.lora.A.weight"].shape == (16, 64)

    fresh = tiny_qwen()
    load_lora(fresh, tmp_path / "lora_64.pth")
    assert all(m.scale == 1 for m in fresh.modules() if isinstance(m, LoRALinear))  # MiniMind's meaning
    assert (logits(fresh, IDS) - want).abs().max() <= 1e-5
    assert (logits(fresh, IDS) - logits(tiny_qwen(), IDS)).abs().max() > 1e-2


def test_peft_directory_round_trip(tmp_path):
    model = tiny_qwen()
    apply_lora(model, **PATTERNED, dropout=0.05)
    randomize_lora(model)
    want = logits(model, IDS)
    save_lora(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (
        "LORA", "CAUSAL_LM", 4, 8, True)
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["rank_pattern"] == {f"model.layers.{i}.mlp.{p}": 16 for i in range(2) for p in ("up_proj", "down_proj")}
    assert cfg["lora_dropout"] == 0.05

    factors = read_lora(tmp_path / "adapter")
    A, B, scale = factors["model.layers.1.mlp.down_proj"]
    assert len(factors) == 8 and torch.equal(B, model.model.layers[1].mlp.down_proj.lora_B) and scale == 2

    fresh = tiny_qwen()
    names = load_lora(fresh, tmp_path / "adapter")
    assert len(names) == 8
    layer = fresh.model.layers[1].mlp.down_proj
    assert (layer.rank, layer.alpha, layer.use_rslora, layer.dropout_p) == (16, 8, True, 0.05)
    assert (logits(fresh, IDS) - want).abs().max() <= 1e-6


def test_state_dict_round_trip():
    model = tiny_qwen()
    apply_lora(model, rank=4)
    randomize_lora(model)
    sd = lora_state_dict(model)
    assert len(sd) == 2 * 14 and all("lora_" in k for k in sd)
    other = tiny_qwen()
    apply_lora(other, rank=4)
    load_lora_state_dict(other, {f"_orig_mod.{k}": v for k, v in sd.items()})
    assert torch.equal(logits(other, IDS), logits(model, IDS))
    bad = tiny_qwen()
    apply_lora(bad, rank=2)
    with pytest.raises(LoRAError, match="model.layers.0.self_attn.q_proj.lora_A"):
        load_lora_state_dict(bad, sd)


def test_mismatched_files_raise_user_errors(tmp_path):
    d = fixture("minimind2_dense")
    sd = torch.load(d / "lora_rank4.pth")
    model = load_minimind(d / "weights.pth")
    torch.save({k.replace("layers.1", "layers.7"): v for k, v in sd.items()}, tmp_path / "other.pth")
    with pytest.raises(LoRAError, match=r"other\.pth.*'model\.layers\.7\.self_attn\.q_proj\.lora\.A\.weight'"):
        load_lora(model, tmp_path / "other.pth")
    torch.save({k: (v[:, :32] if k.endswith("q_proj.lora.A.weight") else v) for k, v in sd.items()},
               tmp_path / "narrow.pth")
    with pytest.raises(LoRAError, match=r"narrow\.pth.*model\.layers\.0\.self_attn\.q_proj\.lora\.A\.weight"):
        load_lora(model, tmp_path / "narrow.pth")
    with pytest.raises(LoRAError, match="weights.pth.*not a MiniMind LoRA key"):
        load_lora(model, d / "weights.pth")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # a failed load leaves the model alone


def test_damaged_peft_directories_raise_user_errors(tmp_path):
    """A truncated or foreign adapter_config.json or safetensors file, or a config whose rank does not match
    the weights, is a LoRAError naming the file (never a JSON or safetensors traceback)."""
    model = tiny_qwen()
    apply_lora(model, rank=4, alpha=8, targets="q_proj,v_proj")
    save_lora(model, tmp_path / "good")
    config = (tmp_path / "good" / "adapter_config.json").read_text()
    weights = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    cases = {
        "truncated_config": (config[: len(config) // 2], weights, "not valid JSON"),
        "list_config": ("[]", weights, "holds a JSON list"),
        "truncated_weights": (config, weights[: len(weights) // 2], "cannot be read as safetensors"),
        "wrong_rank": (config.replace('"r": 4', '"r": 8'), weights, "says rank 8"),
    }
    for name, (cfg_text, blob, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(cfg_text)
        (folder / "adapter_model.safetensors").write_bytes(blob)
        with pytest.raises(LoRAError, match=message):
            load_lora(tiny_qwen(), folder)
    load_lora(tiny_qwen(), tmp_path / "good")   # the untouched directory still loads


# ------------------------------------------------------------------------- torch.compile

def test_lora_linear_compiles_without_graph_breaks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.SiLU(), nn.Linear(48, 32))
    apply_lora(net, rank=4, alpha=8, dropout=0.0)
    randomize_lora(net)
    for p in net.parameters():  # bf16 base next to fp32 LoRA, as the trainer may hold it
        if "lora_" not in [n for n, q in net.named_parameters() if q is p][0]:
            p.data = p.data.to(torch.bfloat16)
    x = torch.randn(4, 32).to(torch.bfloat16)
    eager = net(x)
    eager.float().sum().backward()
    eager_grads = [p.grad.clone() for p in lora_parameters(net)]
    net.zero_grad(set_to_none=True)
    compiled = torch.compile(net, fullgraph=True)(x)  # fullgraph: any graph break is an error
    compiled.float().sum().backward()
    assert compiled.dtype == torch.bfloat16 and (compiled.float() - eager.float()).abs().max() <= 1e-2
    for a, b in zip(lora_parameters(net), eager_grads):
        assert a.grad.dtype == torch.float32 and (a.grad - b).abs().max() <= 1e-2 * b.abs().max()


def test_compiled_model_gives_eager_loss_and_grads():
    d = fixture("minimind2_dense")
    model = load_minimind(d / "weights.pth")
    apply_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    ids = torch.load(d / "vectors.pt")["input_ids"]

    def loss_and_grads(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model))
    assert (compiled_loss - eager_loss).abs() <= 1e-5
    for a, b in zip(compiled_grads, eager_grads):
        assert (a - b).abs().max() <= 1e-5
