"""QLoRA training steps (train_lora.py --load_in_4bit) against the same steps on a bf16 base: peak memory, tokens/s.

    python scripts/bench/qlora.py --shape qwen3-8b --variants nf4,bf16 --jsonl out/qlora.jsonl
    python scripts/bench/qlora.py --shape tiny --device cpu --steps 2 --warmup 1     # smoke test

A Qwen3-shaped MiniMind (generation 3 is Qwen3's architecture) with random weights; LoRA r16 (alpha 32) on
every linear layer but lm_head; bf16 autocast, the fused LoRA path where it applies (not on NF4 layers), fused
linear cross-entropy and fused AdamW as the trainer runs them; batch x seq random tokens, every position
supervised, one optimizer step per iteration. Each variant runs in its own process (clean peak memory).
Peak memory is torch.cuda.max_memory_allocated from the first step on (after the base is built and
quantized); tokens/s is from the median timed step (CUDA events).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
}
VARIANTS = {  # base storage, torch.compile of the decoder (no CUDA graphs: rows of one sequence, as bench_lora)
    "nf4": dict(nf4=True, compile=False),
    "nf4-compile": dict(nf4=True, compile=True),
    "bf16": dict(nf4=False, compile=False),
    "bf16-compile": dict(nf4=False, compile=True),
    "nf4-ckpt": dict(nf4=True, compile=False, ckpt=True),
    "bf16-ckpt": dict(nf4=False, compile=False, ckpt=True),
}


def run_one(shape_name: str, variant: str, batch: int, seq: int, steps: int, warmup: int, device: str) -> dict:
    """Build, train `warmup + steps` steps, and measure one configuration in this process."""
    from model.model_lora import apply_lora, lora_parameters, set_lora_fused
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from model.nf4 import quantize_base
    from trainer.loss import SupervisedLoss, supervision

    opts, dev = VARIANTS[variant], torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    start = time.perf_counter()
    with dev:
        model = MiniMindForCausalLM(MiniMindConfig(generation=3, **SHAPES[shape_name])).to(torch.bfloat16)
    apply_lora(model, rank=16, alpha=32)
    set_lora_fused(model, cuda)
    quantized = quantize_base(model, dev) if opts["nf4"] else (0, 0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - start
    model.train()
    if opts.get("ckpt"):
        from trainer.engine import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if opts["compile"]:
        model.model.compile()
    loss_module = SupervisedLoss(model)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    vocab = SHAPES[shape_name]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(dev)
    sup_index, sup_targets = supervision(ids)
    resting = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        with torch.autocast(dev.type, torch.bfloat16, enabled=cuda):
            ce, aux = loss_module(ids, sup_index, sup_targets)
        loss = ce / sup_targets.numel() + aux
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            end.synchronize()
            ms = begin.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1000
        losses.append(loss.item())
        if i >= warmup:
            times.append(ms)
    step_ms = statistics.median(times)
    return dict(shape=shape_name, variant=variant, batch=batch, seq=seq, device=torch.cuda.get_device_name() if cuda
                else "cpu", nf4_layers=quantized[0], nf4_gib=round(quantized[1] / 2**30, 3),
                resting_gib=round(resting / 2**30, 2),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                step_ms=round(step_ms, 1), tokens_per_s=round(batch * seq / step_ms * 1000),
                build_s=round(build_s, 1), first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
                torch=torch.__version__)


def main() -> None:
    """Run each variant in a subprocess and print (and append to --jsonl) one JSON line per result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-0.6b", choices=list(SHAPES))
    p.add_argument("--variants", default="nf4,bf16", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    p.add_argument("--jsonl", default=None, help="append each result here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.shape, args.variants, args.batch, args.seq, args.steps, args.warmup,
                                 args.device)), flush=True)
        return
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", "--shape", args.shape, "--variants", variant, "--batch",
               str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
            result = json.loads(lines[-1]) if done.returncode == 0 and lines else dict(
                shape=args.shape, variant=variant, error=(done.stderr or done.stdout)[-1500:])
        except subprocess.TimeoutExpired:
            result = dict(shape=args.shape, variant=variant, error=f"timed out after {args.timeout:g} s")
        print(json.dumps(result), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
