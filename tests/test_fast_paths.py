"""Each fast training path against the plain one it replaces: same loss and LoRA grads (fp32, CPU)."""

import torch
from torch import nn

from model.model_lora import apply_lora, lora_parameters, set_lora_fused
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.loss import SupervisedLoss, supervision


def tiny_model(seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = MiniMindConfig(generation=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, vocab_size=300)
    model = MiniMindForCausalLM(cfg)
    apply_lora(model, rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B, or half of every gradient check would be vacuous
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def batch(seed: int = 0, prompt: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels


def loss_and_grads(model: nn.Module, loss: SupervisedLoss, ids: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    sup_index, sup_targets = supervision(labels)
    ce, _ = loss(ids, sup_index, sup_targets)
    ce.backward()
    return ce.detach(), [p.grad.clone() for p in lora_parameters(model)]


def assert_close(a: tuple, b: tuple, tol: float = 1e-5) -> None:
    assert (a[0] - b[0]).abs() <= tol * b[0].abs()
    for ga, gb in zip(a[1], b[1]):
        assert (ga - gb).abs().max() <= tol * gb.abs().max() + 1e-7


def test_fused_lora_model_gives_plain_loss_and_grads():
    model = tiny_model()
    ids, labels = batch()
    loss = SupervisedLoss(model, fused=False)
    plain = loss_and_grads(model, loss, ids, labels)
    set_lora_fused(model)
    assert_close(loss_and_grads(model, loss, ids, labels), plain)


def test_fused_lora_under_bf16_autocast_runs_in_bf16():
    """Under autocast the plain path's LoRA GEMMs run in bf16 too; the fused one must agree to bf16 precision."""
    model = tiny_model()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
        set_lora_fused(model)
        fused = layer(x)
    assert fused.dtype == plain.dtype == torch.bfloat16
    assert (fused.float() - plain.float()).abs().max() <= 3e-2 * plain.float().abs().max()


def test_fused_lora_is_off_outside_training():
    model = tiny_model()
    set_lora_fused(model)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = x @ layer.weight.T + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
        assert (layer.eval()(x) - want).abs().max() < 1e-5


def test_linear_cross_entropy_gives_checkpointed_chunk_loss_and_grads():
    model = tiny_model()
    ids, labels = batch()
    plain = loss_and_grads(model, SupervisedLoss(model, chunk_tokens=16, fused=False), ids, labels)
    for chunk in (16, 1000):  # several chunks with a short last one, and a single chunk
        assert_close(loss_and_grads(model, SupervisedLoss(model, chunk_tokens=chunk), ids, labels), plain)
    full = nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1),
                                       reduction="sum")
    assert (plain[0] - full).abs() <= 1e-5 * full


def test_linear_cross_entropy_with_nothing_supervised_still_backpropagates():
    model = tiny_model()
    ids, labels = batch(prompt=20)
    ce, grads = loss_and_grads(model, SupervisedLoss(model), ids, labels)
    assert ce == 0 and all(g.abs().max() == 0 for g in grads)


def test_fused_lora_compiles_without_graph_breaks():
    torch.manual_seed(0)
    layer = tiny_model().model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, 64, requires_grad=True)
    g = torch.randn(2, 5, 64)
    outs = []
    for run in (layer, torch.compile(layer, fullgraph=True)):  # fullgraph: a graph break is an error
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (run(x) * g).sum().backward()
        outs.append((x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        layer.fused = True
    for a, b in zip(*outs):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_unmasked_gqa_attention_matches_the_repeated_kv_path():
    """No mask: SDPA reads the shared kv heads (enable_gqa); an all-ones mask takes the repeat_interleave path."""
    model = tiny_model().eval()
    ids, _ = batch()
    with torch.no_grad():
        fast = model(ids).logits
        plain = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_bench_script_tiny_smoke(tmp_path):
    """scripts/bench_lora.py --tiny runs every stack and layout on the CPU and writes its JSON."""
    import json

    from scripts.bench_lora import main

    assert main(["--tiny", "--json", str(tmp_path / "bench.json")]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in results["steps"]] == ["peft", "ours-eager", "ours"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in results["steps"])
    assert all("error" not in r and r["samples_per_s"] > 0 for r in results["sft_mix"])
    sft = {r["name"]: r["loss"] for r in results["sft_mix"]}
    assert abs(sft["ours-pad-max"] - sft["minimind-pad-max"]) < 1e-4  # same batches, same loss
