"""QLoRA: the NF4 format against its reference (code book, blocks, double quantization), a QLoRA step against
the same step on the unquantized base, compile, and train_lora.py --load_in_4bit end to end."""

import argparse
import copy
import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from model.model_lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_parameters,
    merge_lora,
    set_lora_fused,
)
from model.model_minimind import load_minimind
from model.nf4 import BLOCK, NF4_CODE, SCALE_BLOCK, NF4Linear, NF4Weight, nf4_linear, quantize_base
from tests.train_utils import (
    REPO,
    lora_args,
    run_inprocess,
    run_timed,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    torchrun,
    write_chat_data,
)
from trainer import train_lora
from trainer.args import FlagError
from trainer.lora_setup import build_lora
from trainer.train_lora import main


def unpack(q: NF4Weight) -> torch.Tensor:
    """The 4-bit indices in weight order (first weight of a byte in its high nibble, as bitsandbytes)."""
    return torch.stack([q.codes >> 4, q.codes & 15], dim=1).view(-1).long()


def test_code_book_is_the_qlora_normal_quantiles():
    """bitsandbytes' create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0,1) quantiles, 0, /max."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(NF4_CODE.double(), levels / levels.max(), atol=2e-7, rtol=0)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[15] == 1


def test_quantize_matches_a_float64_reference():
    """Indices, absmax per block of 64 and its int8 double quantization per 256 blocks, against brute force."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 100, generator=g) * 0.02  # 150 blocks: neither a multiple of 256 nor rows of 64
    w[5, 7] = 0.5  # an outlier: only its own block gets a large absmax
    q = NF4Weight(w)
    flat = F.pad(w.double().reshape(-1), (0, (-w.numel()) % BLOCK)).view(-1, BLOCK)
    absmax = flat.abs().amax(dim=1)
    want = (flat / absmax[:, None] - NF4_CODE.double()[None, None, :].transpose(0, 1).reshape(16, 1, 1)
            ).abs().argmin(dim=0).view(-1)
    assert torch.equal(unpack(q), want)
    # Double quantization: (absmax - mean) in int8 steps of (max |.| per 256 blocks) / 127: within half a step.
    scales = (q.scale_codes.view(-1, SCALE_BLOCK).double() * q.scale_factors.double()[:, None] / 127
              + q.scale_offset.double()).view(-1)[:len(absmax)]
    step = (absmax - absmax.mean()).abs().max() / 127
    assert (scales - absmax).abs().max() <= step / 2 * (1 + 1e-5)
    assert q.scale_factors.numel() == 1 and q.scale_codes.numel() == SCALE_BLOCK and q.codes.numel() == 150 * 32
    # Dequantized = level × dequantized absmax, one rounding; within half the widest level gap of the true value.
    dense = q.dequantize(torch.float32)
    ref = (NF4_CODE.double()[want].view(-1, BLOCK) * scales[:, None]).view(-1)[:w.numel()].view(w.shape)
    torch.testing.assert_close(dense.double(), ref, atol=1e-9, rtol=1e-6)
    half_gap = (NF4_CODE[15] - NF4_CODE[14]).item() / 2
    bound = F.pad((absmax * half_gap + step / 2).repeat_interleave(BLOCK), (0, 0))[:w.numel()].view(w.shape)
    assert ((dense.double() - w.double()).abs() <= bound + 1e-9).all()


def test_blocks_are_64_weights_and_size_is_4_127_bits():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1024, 4096, generator=g) * 0.02
    q = NF4Weight(w)
    assert q.nbytes() * 8 / w.numel() == pytest.approx(4 + 8 / BLOCK + 32 / (BLOCK * SCALE_BLOCK), abs=1e-4)
    error = (q.dequantize(torch.float32) - w).norm() / w.norm()
    assert 0.085 < error < 0.10  # NF4's known ~9% RMS error on normal weights
    w2 = w.clone()
    w2.view(-1)[BLOCK + 3] *= 40  # block 1 only: the other blocks' indices stay
    codes = NF4Weight(w2).codes
    changed = (codes != q.codes).nonzero().view(-1)
    assert changed.numel() > 0 and changed.min() >= BLOCK // 2 and changed.max() < BLOCK


def tiny_qwen(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16))


def lora_model(seed: int, use_dora: bool = False) -> nn.Module:
    """A tiny Qwen3 with a bf16-valued base (QLoRA quantizes a bf16 checkpoint), fp32 compute, random LoRA."""
    model = tiny_qwen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    apply_lora(model, rank=4, alpha=8, targets="q_proj,v_proj,o_proj,down_proj", use_dora=use_dora)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=g)) if p.dim() == 1 else
                    torch.randn(p.shape, generator=g) * 0.1)
    return model


IDS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))


def step(model: nn.Module) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.view(-1) for p in lora_parameters(model)])


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_step_is_the_step_on_the_dequantized_base(use_dora):
    """The machinery exactly: every quantized linear computes with W = dequantize(NF4(W)) in forward and backward."""
    model = lora_model(0, use_dora)
    reference = copy.deepcopy(model)
    count, _ = quantize_base(model)
    assert count == 2 * 7  # the 4 LoRA layers and the 3 plain ones per decoder layer; lm_head stays
    assert isinstance(model.model.layers[0].mlp.up_proj, NF4Linear) and model.model.layers[0].self_attn.q_proj.weight is None
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (LoRALinear, NF4Linear)):
                reference.get_submodule(name).weight.copy_(module.weight_nf4.dequantize(torch.float32))
    (loss, grads), (ref_loss, ref_grads) = step(model), step(reference)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(grads, ref_grads, atol=1e-6, rtol=1e-5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fresh_dora_base_quantized_onto_the_gpu_gets_the_4bit_weights_norm():
    """The trainer quantizes while the LoRA factors are still on the CPU: DoRA's magnitude must come from the codes
    alone (B = 0), wherever they are."""
    model = tiny_qwen(0)
    apply_lora(model, rank=4, targets="q_proj,v_proj,o_proj,down_proj", use_dora=True)  # fresh: B = 0
    quantize_base(model, "cuda")
    for module in model.modules():
        if isinstance(module, LoRALinear):
            dense = module.weight_nf4.dequantize(torch.float32)
            torch.testing.assert_close(module.lora_magnitude_vector.detach().cpu(),
                                       torch.linalg.vector_norm(dense, dim=1).cpu())


def test_qlora_step_is_close_to_the_bf16_base_step():
    """Against the unquantized (bf16-valued) base. NF4 moves each weight by ~9% RMS (test above), so the loss
    moves little (measured ≤ 0.07% here: the errors are zero-mean and average out over a row) while the LoRA
    gradient, which is taken at other activations, moves more (measured relative error 0.18-0.31, cosine
    0.96-0.98 over 3 seeds). Tolerances: loss within 1%, cosine ≥ 0.9; a wrong nibble order, block or scale
    gives a loss off by more (checked below with the nibbles swapped)."""
    for seed in range(3):
        model = lora_model(seed)
        reference = copy.deepcopy(model)
        quantize_base(model)
        (loss, grads), (ref_loss, ref_grads) = step(model), step(reference)
        assert loss == pytest.approx(ref_loss, rel=1e-2)
        assert F.cosine_similarity(grads, ref_grads, dim=0) >= 0.9
        if seed == 0:  # the tolerance catches a broken format: swap each byte's two indices
            for module in model.modules():
                if isinstance(module, (LoRALinear, NF4Linear)):
                    c = module.weight_nf4.codes
                    c.copy_((c << 4) | (c >> 4))
            bad_loss, bad_grads = step(model)
            assert bad_loss != pytest.approx(ref_loss, rel=1e-2) or F.cosine_similarity(bad_grads, ref_grads, dim=0) < 0.9


def test_fused_lora_on_a_4bit_base_equals_the_plain_path():
    """The GPU training path (set_lora_fused: one GEMM on dequantize(W) + s·B·A, x kept in its own dtype) against
    the plain path on the same 4-bit base, in fp32."""
    model = lora_model(0)
    quantize_base(model)
    model.train()
    want_loss, want = step(model)
    set_lora_fused(model)
    loss, grads = step(model)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    torch.testing.assert_close(grads, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_nf4_layer_compiles_without_graph_breaks(fused):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64))
    apply_lora(net, rank=4, targets="0")
    quantize_base(net)
    set_lora_fused(net, fused)
    assert isinstance(net[2], NF4Linear)
    with torch.no_grad():
        net[0].lora_B.normal_()
    x = torch.randn(8, 64)
    eager = net(x)
    eager.sum().backward()
    want = [p.grad.clone() for p in lora_parameters(net)]
    net.zero_grad(set_to_none=True)
    compiled = torch.compile(net, fullgraph=True)(x)  # any graph break is an error
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(lora_parameters(net), want):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_autocast_runs_the_nf4_matmul_in_bf16():
    q = NF4Weight(torch.randn(32, 64) * 0.02)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nf4_linear(x, q, None)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ q.dequantize(torch.float32).t(), atol=2e-2 * y.abs().max().item(),
                               rtol=0)


def test_merge_into_a_4bit_base_is_refused():
    model = lora_model(0)
    quantize_base(model)
    with pytest.raises(LoRAError, match="4-bit base"):
        merge_lora(model)


def test_4bit_with_fsdp_is_refused():
    args = argparse.Namespace(load_in_4bit=True, fsdp=True)
    with pytest.raises(FlagError, match="--load_in_4bit does not work with --fsdp"):
        build_lora(tiny_qwen(), args, torch.device("cpu"))


def test_train_lora_4bit_packing_accumulation_resume(tmp_path, capsys, monkeypatch):
    """--load_in_4bit with --packing and accumulation; stopped (SIGTERM) after step 2 and resumed, it ends where
    the uninterrupted run ends; the saved adapter is a normal LoRA that loads on the unquantized base here and
    in PEFT."""
    tokenizer_dir()
    weight, data = save_tiny_minimind(tmp_path / "full_sft_64.pth"), write_chat_data(tmp_path / "data.jsonl", 16)
    flags = dict(batch_size=2, accumulation_steps=2, learning_rate=1e-2, packing=True, max_seq_len=64, max_steps=4)
    argv = {d: lora_args(tmp_path, weight, data, save_dir=tmp_path / d, **flags) + ["--load_in_4bit"] for d in "ab"}
    assert run_inprocess(main, argv["a"]) == 0
    assert re.search(r"14 base linear layers in NF4 \(0\.\d MiB\)", capsys.readouterr().out)  # tiny: MiB, not 0.00 GiB
    real_step, calls = train_lora.train_step, []

    def stop_after_step_2(*args, **kwargs):  # as if the user pressed Ctrl-C during step 2
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_lora, "train_step", stop_after_step_2)
    assert run_inprocess(main, argv["b"]) == 0
    assert "stopped at step 2/4" in capsys.readouterr().out
    monkeypatch.setattr(train_lora, "train_step", real_step)
    assert run_inprocess(main, argv["b"] + ["--from_resume", "1"]) == 0
    a, b = (torch.load(tmp_path / d / "lora_identity_64_resume.pth", weights_only=False) for d in ("a", "b"))
    assert a["trainable"].keys() == b["trainable"].keys() and all("nf4" not in k for k in a["trainable"])
    for key in a["trainable"]:
        torch.testing.assert_close(a["trainable"][key], b["trainable"][key], atol=1e-6, rtol=0)
    assert [x for _, x in a["state"]["history"]["train"]] == pytest.approx([x for _, x in b["state"]["history"]["train"]])

    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 6400, (2, 12))
    ours = load_minimind(weight)
    load_lora(ours, tmp_path / "a" / "lora_identity_64.pth")
    theirs = peft.PeftModel.from_pretrained(load_minimind(weight), str(tmp_path / "a" / "lora_identity_64")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.eval()(ids).logits, atol=2e-3, rtol=0)  # .pth is fp16


@pytest.mark.slow
def test_two_ranks_4bit_equal_one_process(tmp_path):
    """Two gloo ranks × batch 4 with --load_in_4bit train the LoRA of one process × batch 8 (each rank quantizes
    the same base the same way; the LoRA gradients are averaged as without 4 bits), with --gradient_checkpointing."""
    tokenizer_dir()
    weight, data = save_tiny_minimind(tmp_path / "full_sft_64.pth"), write_chat_data(tmp_path / "data.jsonl", 9)
    flags = dict(epochs=1, learning_rate=1e-2, gradient_checkpointing=True)
    one = lora_args(tmp_path, weight, data, save_dir=tmp_path / "one", batch_size=8, **flags) + ["--load_in_4bit"]
    assert run_inprocess(main, one) == 0
    cmd = torchrun("--standalone", "--nproc_per_node", "2", str(REPO / "trainer" / "train_lora.py"),
                   *lora_args(tmp_path, weight, data, save_dir=tmp_path / "two", batch_size=4, **flags),
                   "--load_in_4bit")
    run = run_timed(cmd, cwd=tmp_path, env=subprocess_env())
    assert run.returncode == 0, run.output[-4000:]
    assert "2 process(es) on cpu" in run.output and "base linear layers in NF4" in run.output
    a, b = (torch.load(tmp_path / d / "lora_identity_64_resume.pth", weights_only=False) for d in ("one", "two"))
    # AdamW moves each weight by about the learning rate whatever its gradient's size, so where a gradient is
    # near zero, rounding shows (batch 4 sums in another order than batch 8 on some CPUs: 3.9e-5 on a 16-core
    # x86 machine). A rank's gradient left out of the average moves many weights by about 1e-2.
    for key in a["trainable"]:
        torch.testing.assert_close(b["trainable"][key], a["trainable"][key], atol=1e-4, rtol=0)
    assert [x for _, x in b["state"]["history"]["train"]] == pytest.approx(
        [x for _, x in a["state"]["history"]["train"]], rel=1e-5)


@pytest.mark.slow
def test_train_lora_4bit_compiled_equals_eager(tmp_path):
    """--use_compile 1 --packing --load_in_4bit (the NF4 dequantization traced into the compiled decoder) trains
    the LoRA the eager run trains."""
    tokenizer_dir()
    weight, data = save_tiny_minimind(tmp_path / "full_sft_64.pth"), write_chat_data(tmp_path / "data.jsonl", 12)
    runs = {}
    for name, flag in (("eager", "0"), ("compiled", "1")):
        torch._dynamo.reset()
        argv = lora_args(tmp_path, weight, data, save_dir=tmp_path / name, batch_size=4, epochs=1, packing=True,
                         learning_rate=1e-2, max_seq_len=64, use_compile=flag) + ["--load_in_4bit"]
        assert run_inprocess(main, argv) == 0
        runs[name] = torch.load(tmp_path / name / "lora_identity_64_resume.pth", weights_only=False)
    eager, compiled = runs["eager"], runs["compiled"]
    for key in eager["trainable"]:
        torch.testing.assert_close(compiled["trainable"][key], eager["trainable"][key], atol=2e-5, rtol=0)
    assert [x for _, x in compiled["state"]["history"]["train"]] == pytest.approx(
        [x for _, x in eager["state"]["history"]["train"]], rel=1e-5)


def test_a_4bit_run_on_minimind_s_square_layers_gets_no_note_on_minimind_s_loader(tmp_path, capsys):
    # The NF4 layers hold no weight tensor: they are still the square layers MiniMind's load_lora reads
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 4)
    argv = lora_args(tmp_path, weight, data, max_steps=1, lora_targets="square") + ["--load_in_4bit"]
    assert run_inprocess(main, argv) == 0
    out = capsys.readouterr().out
    assert "base linear layers in NF4" in out and "MiniMind's own load_lora" not in out, out
    argv = lora_args(tmp_path, weight, data, max_steps=1, lora_targets="q_proj", save_dir=tmp_path / "q") + [
        "--load_in_4bit"]
    assert run_inprocess(main, argv) == 0
    assert ("MiniMind's own load_lora reads only the square layers (o_proj, q_proj) and fails on it (no o_proj "
            "factors)") in capsys.readouterr().out
