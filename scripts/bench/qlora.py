"""QLoRA training steps (train_lora.py --load_in_4bit) against the same steps on a bf16 base and against
PEFT + bitsandbytes QLoRA: peak memory, tokens/s.

    python scripts/bench/qlora.py --shapes qwen3-0.6b=nf4,bf16,peft-bnb qwen3-8b \
        --variants nf4,nf4-ckpt,nf4-compile,peft-bnb-ckpt,peft-bnb --jsonl $OUT/qlora.jsonl   # issue #20
    python scripts/bench/qlora.py --shapes tiny --device cpu --steps 2 --warmup 1     # smoke test

The first command is the whole #20 benchmark on one GPU (batch 4 x 1024; the 0.6B shape first, then the 8B
shape with the variants most likely to run out of memory or time last; --timeout caps each variant).
Each variant runs in its own process (clean peak memory) and its JSON line is appended as soon as it ends,
so a run cut short keeps what finished; a variant that fails reports its error in its line.

Ours (nf4*, bf16*): a Qwen3-shaped MiniMind (generation 3 is Qwen3's architecture) with random weights;
LoRA r16 (alpha 32) on every linear layer but lm_head; bf16 autocast, the fused LoRA path where it applies
(not on NF4 layers), fused linear cross-entropy and fused AdamW as the trainer runs them; *-compile compiles
each decoder layer as the trainer's default --compile_scope auto does (no CUDA graphs: rows of one sequence,
as bench_lora).

The peer (peft-bnb*; needs `pip install bitsandbytes`, an optional benchmark peer, no dependency of the repo):
transformers' Qwen3ForCausalLM of the same shape (random weights, seed 0, its own init), every linear layer
but lm_head a bitsandbytes Linear4bit as from_pretrained(quantization_config=BitsAndBytesConfig(
load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16)) builds it, then the usual recipe: prepare_model_for_kbit_training
(which casts the parameters left unquantized, norms, embeddings and lm_head, to fp32: the standard recipe,
kept) and get_peft_model with LoRA r16, alpha 32, no dropout on "all-linear"; transformers' own loss (full
logits, upcast to fp32), bf16 autocast, fused AdamW.

Both see the same batch x seq random tokens, every position supervised, one optimizer step per iteration.
Peak memory is torch.cuda.max_memory_allocated from the first step on (after the base is built and
quantized); tokens/s is from the median timed step (CUDA events).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from scripts.bench_lora import timed_steps

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
}
VARIANTS = {  # who builds the model, base storage, per-layer torch.compile, activation checkpointing
    "nf4": dict(stack="ours", nf4=True, compile=False),
    "nf4-compile": dict(stack="ours", nf4=True, compile=True),
    "bf16": dict(stack="ours", nf4=False, compile=False),
    "bf16-compile": dict(stack="ours", nf4=False, compile=True),
    "nf4-ckpt": dict(stack="ours", nf4=True, compile=False, ckpt=True),
    "bf16-ckpt": dict(stack="ours", nf4=False, compile=False, ckpt=True),
    "peft-bnb": dict(stack="peft-bnb", nf4=True, compile=False),
    "peft-bnb-ckpt": dict(stack="peft-bnb", nf4=True, compile=False, ckpt=True),
}
Loss = Callable[[], torch.Tensor]


def build_ours(shape: dict, opts: dict, dev: torch.device,
               ids: torch.Tensor) -> tuple[Loss, list, tuple[int, int]]:
    """MiniMind + LoRA as train_lora.py builds it: (loss of the batch, LoRA params, (NF4 layers, bytes))."""
    from model.model_lora import apply_lora, lora_parameters, set_lora_fused
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from model.nf4 import quantize_base
    from trainer.compiling import compile_decoder
    from trainer.engine import enable_activation_checkpointing
    from trainer.loss import SupervisedLoss, supervision

    torch.manual_seed(0)
    with dev:
        model = MiniMindForCausalLM(MiniMindConfig(generation=3, **shape)).to(torch.bfloat16)
    apply_lora(model, rank=16, alpha=32)
    set_lora_fused(model, dev.type == "cuda")
    quantized = quantize_base(model, dev) if opts["nf4"] else (0, 0)
    model.train()
    if opts.get("ckpt"):
        enable_activation_checkpointing(model)
    if opts["compile"]:
        compile_decoder(model, cuda_graphs=False, per_layer=True)
    loss_module = SupervisedLoss(model)
    sup_index, sup_targets = supervision(ids)

    def loss() -> torch.Tensor:
        """Mean cross-entropy over the supervised positions (+ MoE aux loss, zero here)."""
        ce, aux = loss_module(ids, sup_index, sup_targets)
        return ce / sup_targets.numel() + aux

    return loss, lora_parameters(model), quantized


def build_peft_bnb(shape: dict, opts: dict, dev: torch.device,
                   ids: torch.Tensor) -> tuple[Loss, list, tuple[int, int]]:
    """transformers' Qwen3, bitsandbytes NF4 base, PEFT LoRA (module docstring); returns as build_ours."""
    try:  # optional peers, imported only here
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ModuleNotFoundError as e:
        raise SystemExit(f"peft-bnb needs bitsandbytes and peft (optional benchmark peers): {e}") from None
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**shape, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                      attn_implementation="sdpa", use_cache=False)  # no KV cache built in training forwards
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16, as from_pretrained(dtype=bf16) builds it
    try:
        with dev:
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    # As transformers' replace_with_bnb_linear + Bnb4bitQuantize: Params4bit quantizes when moved to a device.
    # One layer at a time, so each bf16 weight is freed as soon as its 4-bit copy exists.
    head = model.get_output_embeddings()
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    count, held = 0, 0
    for name in names:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=layer).to(dev)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        model.set_submodule(name, layer.requires_grad_(False))
        state = layer.weight.quant_state  # codes, uint8 block scales, their fp32 scales, offset: as NF4Weight
        parts = (layer.weight.data, state.absmax, state.state2.absmax, state.offset)
        count, held = count + 1, held + sum(t.numel() * t.element_size() for t in parts)
        del linear  # its bf16 weight goes now
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT picks its Linear4bit LoRA layer from it
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(opts.get("ckpt")),
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()

    def loss() -> torch.Tensor:
        """transformers' mean next-token cross-entropy (it shifts the labels)."""
        return model(input_ids=ids, labels=ids).loss

    return loss, [p for p in model.parameters() if p.requires_grad], (count, held)


def run_one(shape_name: str, variant: str, batch: int, seq: int, steps: int, warmup: int, device: str) -> dict:
    """Build, train `warmup + steps` steps, and measure one configuration in this process."""
    opts, dev, shape = VARIANTS[variant], torch.device(device), SHAPES[shape_name]
    cuda = dev.type == "cuda"
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(dev)
    start = time.perf_counter()
    build = build_peft_bnb if opts["stack"] == "peft-bnb" else build_ours
    loss_fn, params, quantized = build(shape, opts, dev, ids)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - start
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)

    def step(_batch: object) -> torch.Tensor:
        """Forward under bf16 autocast (CUDA) and backward; timed_steps adds AdamW's step."""
        with torch.autocast(dev.type, torch.bfloat16, enabled=cuda):
            loss = loss_fn()
        loss.backward()
        return loss.detach()

    resting = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms, losses, _ = timed_steps(step, optimizer, [ids], warmup, steps, dev)
    step_ms = statistics.median(ms)
    return dict(shape=shape_name, variant=variant, batch=batch, seq=seq,
                device=torch.cuda.get_device_name() if cuda else "cpu", nf4_layers=quantized[0],
                nf4_gib=round(quantized[1] / 2**30, 3), resting_gib=round(resting / 2**30, 2),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                step_ms=round(step_ms, 1), tokens_per_s=round(batch * seq / step_ms * 1000),
                build_s=round(build_s, 1), first_loss=round(losses[0].item(), 4),
                last_loss=round(losses[-1].item(), 4), torch=torch.__version__)


def plan(shapes: list[str], variants: str) -> list[tuple[str, str]]:
    """(shape, variant) pairs in run order from --shapes items (SHAPE or SHAPE=V1,V2) and --variants."""
    runs = []
    for item in shapes:
        shape, _, own = item.partition("=")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
        for variant in (own or variants).split(","):
            if variant not in VARIANTS:
                raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
            runs.append((shape, variant))
    return runs


def main() -> None:
    """Run each (shape, variant) in a subprocess; print (and append to --jsonl) one JSON line per result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", "--shape", nargs="+", default=["qwen3-0.6b"],
                   help=f"run in order; each SHAPE (with --variants) or SHAPE=V1,V2 (those variants); "
                        f"shapes: {', '.join(SHAPES)}")
    p.add_argument("--variants", default="nf4,bf16", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row (default 1024)")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation)")
    p.add_argument("--device", default="cuda", help="where the steps run (default cuda)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    p.add_argument("--jsonl", default=None, help="append each result here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        runs = plan(args.shapes, args.variants)
    except ValueError as e:
        p.error(str(e))
    if args.one:
        (shape, variant), = runs
        print(json.dumps(run_one(shape, variant, args.batch, args.seq, args.steps, args.warmup, args.device)),
              flush=True)
        return
    for shape, variant in runs:
        cmd = [sys.executable, __file__, "--one", "--shapes", shape, "--variants", variant, "--batch",
               str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
            result = json.loads(lines[-1]) if done.returncode == 0 and lines else dict(
                shape=shape, variant=variant, error=(done.stderr or done.stdout)[-1500:])
        except subprocess.TimeoutExpired:
            result = dict(shape=shape, variant=variant, error=f"timed out after {args.timeout:g} s")
        print(json.dumps(result), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
