"""LoRA training steps side by side: ours vs transformers + PEFT, same model shape, data and settings.

    python scripts/bench_lora.py --shape qwen3-0.6b --json out/bench_06b.json   # the main table (one GPU)
    python scripts/bench_lora.py --shape qwen3-1.7b --variants peft-compile,ours
    python scripts/bench_lora.py --sft-mix --json out/sft_mix.json             # SFT length mix, minimind3-64m
    python scripts/bench_lora.py --max-batch --variants peft-compile,ours      # largest batch at --seq
    python scripts/bench_lora.py --tiny                                        # CPU smoke test (the tests run it)

Every configuration runs in its own subprocess (clean peak memory, no shared compile caches in memory).
Random weights, random tokens; the first `--prompt-frac` of every row is prompt (label -100). One
optimizer step per iteration; the first `--warmup` steps (compilation) are excluded and the table shows
the median of the timed steps (CUDA events). Peak memory is torch.cuda.max_memory_allocated over the
whole run. MFU counts the work any correct implementation must do, the same number for every stack
(flops_per_step): 2 FLOPs per frozen weight per token forward and 2 backward (input gradient) for every
decoder linear, the same for the LM head at supervised positions only, causal attention (QKᵀ and PV,
backward = 2 × forward), and the LoRA factors' 6·r·(in+out) per token; against --peak-tflops.
docs/PERF.md holds the results and what each fast path bought.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SHAPES = {  # minimind-3 layout; generation 3 with these sizes is exactly Qwen3's architecture
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=512),
    "minimind3-64m": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=96, intermediate_size=2432, vocab_size=6400),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=6144, vocab_size=151936),
}

# stack: "peft" (transformers Qwen3ForCausalLM + PEFT, model(labels=...) loss) or "ours" (MiniMindForCausalLM +
# apply_lora + SupervisedLoss + fused AdamW). The ours-* ablations switch our fast paths off one at a time.
VARIANTS = {
    "peft": dict(stack="peft", compile=False),
    "peft-compile": dict(stack="peft", compile=True),
    "peft-ckpt": dict(stack="peft", compile=False, ckpt=True),
    "ours-eager": dict(stack="ours", compile=False, fused_lora=False, fused_ce=False),
    "ours-compile": dict(stack="ours", fused_lora=False, fused_ce=False, compile_mode=None),
    "ours-nofusedce": dict(stack="ours", fused_ce=False, compile_mode=None),
    "ours-no-cudagraphs": dict(stack="ours", compile_mode=None),
    "ours-rope-inline": dict(stack="ours", rope_op=False),  # RoPE tables traced into the graph (no custom op)
    "ours": dict(stack="ours"),
    "ours-blocks": dict(stack="ours", compile="blocks", compile_mode=None),
    "ours-ckpt": dict(stack="ours", ckpt=True, compile_mode=None),
    "ours-qo": dict(stack="ours", targets="q_proj,o_proj"),
}
DEFAULT_VARIANTS = "peft,peft-compile,peft-ckpt,ours-eager,ours-no-cudagraphs,ours,ours-qo"
# `ours` is the step trainer/train_lora.py --compile_scope model runs on a GPU: bf16 autocast, the whole decoder
# compiled and replayed as CUDA graphs (mode reduce-overhead), fused LoRA, fused linear CE, fused AdamW; on rows
# of one sequence each (packed rows of several samples add a block-diagonal attention mask: docs/PERF.md).
DEFAULTS = dict(compile="model", compile_mode="reduce-overhead", ckpt=False, fused_lora=True, fused_ce=True,
                targets="all-linear", attn=None, rope_op=True, autocast=True)


# ------------------------------------------------------------------------- model FLOPs

def lora_io(shape: dict, targets: str) -> int:
    """Σ(in + out) over one layer's LoRA-adapted linears."""
    h, q, kv, f = (shape["hidden_size"], shape["num_attention_heads"] * shape["head_dim"],
                   shape["num_key_value_heads"] * shape["head_dim"], shape["intermediate_size"])
    sizes = dict(q_proj=h + q, k_proj=h + kv, v_proj=h + kv, o_proj=q + h, gate_proj=h + f, up_proj=h + f,
                 down_proj=f + h)
    return sum(sizes.values()) if targets == "all-linear" else sum(sizes[t] for t in targets.split(","))


def flops_per_step(shape: dict, tokens: int, supervised: int, attn_pairs: int, rank: int, targets: str) -> float:
    """Necessary FLOPs of one LoRA step (see the module docstring). attn_pairs: Σ over samples of L(L+1)/2."""
    h, q, kv, f, n = (shape["hidden_size"], shape["num_attention_heads"] * shape["head_dim"],
                      shape["num_key_value_heads"] * shape["head_dim"], shape["intermediate_size"],
                      shape["num_hidden_layers"])
    linear = n * (h * q + 2 * h * kv + q * h + 3 * h * f)
    attention = n * 3 * (2 * 2 * q * attn_pairs)  # QKᵀ and PV over the causal pairs; backward twice forward
    lora = n * 6 * rank * lora_io(shape, targets) * tokens
    return 4 * linear * tokens + 4 * h * shape["vocab_size"] * supervised + attention + lora


# ------------------------------------------------------------------------- the models

def build_ours(shape: dict, opts: dict, device: torch.device, dtype: torch.dtype) -> tuple:
    """MiniMindForCausalLM + our LoRA + SupervisedLoss; returns (step function, LoRA params)."""
    from model import model_minimind
    from model.model_lora import apply_lora, lora_parameters, set_lora_fused
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from trainer.loss import SupervisedLoss

    if not opts["rope_op"]:  # the ablation: the tables' math traced into the graph (this process only)
        model_minimind._rope_tables = model_minimind._rope_math

    with torch.device(device):
        model = MiniMindForCausalLM(MiniMindConfig(generation=3, **shape)).to(dtype)
    apply_lora(model, rank=opts["rank"], alpha=2 * opts["rank"], targets=opts["targets"])
    set_lora_fused(model, opts["fused_lora"])
    model.train()
    if opts["ckpt"]:
        model.model.gradient_checkpointing = True
    if opts["compile"] == "blocks":  # each decoder layer: the identical layers share one graph (compiles ~10x faster)
        for layer in model.model.layers:
            layer.compile(fullgraph=True)
    elif opts["compile"]:  # the whole decoder as one graph, as trainer/train_lora.py --use_compile does
        model.model.compile(fullgraph=True, mode=opts["compile_mode"])
    loss_module = SupervisedLoss(model, fused=opts["fused_ce"])
    params = lora_parameters(model)

    def step(batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype, enabled=opts["autocast"] and device.type == "cuda"):
            ce, aux = loss_module(batch["input_ids"], batch["sup_index"], batch["sup_targets"],
                                  attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
        loss = ce / batch["sup_targets"].numel() + aux
        loss.backward()
        return loss.detach()

    return step, params


def build_peft(shape: dict, opts: dict, device: torch.device, dtype: torch.dtype) -> tuple:
    """transformers' Qwen3ForCausalLM of the same shape + PEFT LoRA; the loss is transformers' own."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**shape, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768,
                      attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    targets = "all-linear" if opts["targets"] == "all-linear" else opts["targets"].split(",")
    model = get_peft_model(model, LoraConfig(r=opts["rank"], lora_alpha=2 * opts["rank"], lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    if opts["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    run = torch.compile(model) if opts["compile"] else model
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict) -> torch.Tensor:
        loss = run(input_ids=batch["input_ids"], labels=batch["labels"],
                   attention_mask=batch.get("attention_mask")).loss
        loss.backward()
        return loss.detach()

    return step, params


# ------------------------------------------------------------------------- fixed-shape step benchmark

def random_batches(shape: dict, batch: int, seq: int, prompt_frac: float, n: int, device: torch.device) -> list:
    """n batches of random tokens, the first prompt_frac of each row unsupervised."""
    from trainer.loss import supervision

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : int(seq * prompt_frac)] = -100
        sup_index, sup_targets = supervision(labels)
        b = dict(input_ids=ids, labels=labels, sup_index=sup_index, sup_targets=sup_targets)
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_steps(step: Callable, optimizer: torch.optim.Optimizer, batches: list, device: torch.device) -> None:
    """Print (to stderr) the CUDA kernels that took the most time over 2 steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for b in batches[:2]:
            step(b)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70),
          file=sys.stderr)


class Timer:
    """Milliseconds of device work between construction and stop(): CUDA events, or the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> Callable[[], float]:
        """Record the end; the returned function reads the time (after a synchronize, on CUDA)."""
        if self.cuda:
            self.end.record()
            return lambda: self.start.elapsed_time(self.end)
        ms = (time.perf_counter() - self.t0) * 1e3
        return lambda: ms


def graph_count() -> int:
    """Graphs torch.compile has produced in this process (recompiles show up here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])



def timed_steps(step: Callable, optimizer: torch.optim.Optimizer, batches: list, warmup: int, steps: int,
                device: torch.device) -> tuple[list[float], list[torch.Tensor], float]:
    """Run `warmup + steps` optimizer steps; return the timed steps' milliseconds, every loss, and the
    seconds the first step took (compile and graph capture included)."""
    times, losses = [], []
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        timer = Timer(device)
        losses.append(step(batches[i % len(batches)]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(timer.stop())
        if i == 0:
            sync(device)
            first_step_s = time.perf_counter() - t0
    sync(device)
    return [t() for t in times[warmup:]], losses, first_step_s

def run_step_variant(opts: dict) -> dict:
    """Build one stack, train warmup + steps, and return its timings (runs in a subprocess)."""
    device, dtype = torch.device(opts["device"]), getattr(torch, opts["dtype"])
    shape = SHAPES[opts["shape"]]
    torch.manual_seed(0)
    build = build_ours if opts["stack"] == "ours" else build_peft
    step, params = build(shape, opts, device, dtype)
    # Ours: fused AdamW as the trainer uses; PEFT: torch's default AdamW (foreach), as HF Trainer's adamw_torch.
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True if opts["stack"] == "ours" and
                                  device.type == "cuda" else None)
    batches = random_batches(shape, opts["batch"], opts["seq"], opts["prompt_frac"], 4, device)
    ms, losses, first_step_s = timed_steps(step, optimizer, batches, opts["warmup"], opts["steps"], device)
    if opts.get("profile"):
        profile_steps(step, optimizer, batches, device)
    step_ms = statistics.median(ms)
    b = batches[0]
    tokens, supervised = b["input_ids"].numel(), b["sup_targets"].numel()
    flops = flops_per_step(shape, tokens, supervised, opts["batch"] * opts["seq"] * (opts["seq"] + 1) // 2,
                           opts["rank"], opts["targets"])
    return dict(tokens_per_s=tokens / step_ms * 1e3, step_ms=step_ms, step_ms_spread=max(ms) - min(ms),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
                mfu=flops / (step_ms / 1e3) / (opts["peak_tflops"] * 1e12), tflop_per_step=flops / 1e12,
                first_step_s=first_step_s, loss_first=losses[0].item(), loss_last=losses[-1].item(),
                graphs=graph_count(), trainable=sum(p.numel() for p in params))


# ------------------------------------------------------------------------- the realistic SFT length mix

def sft_lengths(n: int, max_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lengths and prompt lengths of a MiniMind-like SFT mix (fixed seed).

    70% short identity-style chats (log-normal, median 80 tokens), 30% longer general chats (median
    350); both clipped to [16, max_len]. The prompt (system + user turn) is 20–60% of each sample.
    """
    rng = np.random.default_rng(seed)
    short = rng.random(n) < 0.7
    lengths = np.where(short, rng.lognormal(math.log(80), 0.5, n), rng.lognormal(math.log(350), 0.6, n))
    lengths = np.clip(lengths.round(), 16, max_len).astype(np.int64)
    prompts = np.maximum(1, (lengths * rng.uniform(0.2, 0.6, n)).astype(np.int64))
    return lengths, prompts


def sft_dataset(n: int, max_len: int, vocab: int, seed: int = 0) -> object:
    """A TokenizedDataset of bigram-chain token streams (learnable, so the losses move) with the mix's lengths."""
    from dataset.lm_dataset import TokenizedDataset

    lengths, prompts = sft_lengths(n, max_len, seed)
    rng = np.random.default_rng(seed + 1)
    successors = rng.integers(3, vocab, (vocab, 4))  # each token is followed by one of 4 tokens
    total = int(lengths.sum())
    ids = np.empty(total, dtype=np.int32)
    choice = rng.integers(0, 4, total)
    mask = np.ones(total, dtype=bool)
    pos = 0
    for length, prompt in zip(lengths, prompts):
        ids[pos] = 1  # bos
        for j in range(1, length):
            ids[pos + j] = successors[ids[pos + j - 1], choice[pos + j]]
        mask[pos:pos + prompt] = False
        pos += length
    return TokenizedDataset(ids, mask, lengths)


def grouped_batches(lengths: np.ndarray, batch: int, seed: int, window: int = 64) -> list[list[int]]:
    """Length-grouped batches: shuffle, sort inside windows of window×batch samples, shuffle the batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    batches = []
    for lo in range(0, len(order), window * batch):
        chunk = order[lo:lo + window * batch]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch].tolist() for i in range(0, len(chunk), batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_to(batch: dict, width: int) -> dict:
    """Right-pad a padded batch to `width` columns (MiniMind's pad-to-max_seq_len)."""
    extra = width - batch["input_ids"].shape[1]
    fill = dict(input_ids=0, labels=-100, attention_mask=0)
    return {k: torch.cat([v, torch.full((v.shape[0], extra), fill[k], dtype=v.dtype)], dim=1) for k, v in batch.items()}


def sft_batches(opts: dict, data: object) -> list[dict]:
    """The epoch's batches on the CPU in the layout opts["layout"] asks for (with supervised positions)."""
    from dataset.lm_dataset import PackedDataset, collate_packed, collate_padded
    from trainer.loss import supervision

    n, batch, max_len, layout = len(data), opts["batch"], opts["seq"], opts["layout"]
    if layout == "pad-max":  # MiniMind: every sample padded to max_seq_len, random order
        order = np.random.default_rng(0).permutation(n).tolist()
        batches = [pad_to(collate_padded([data[i] for i in order[lo:lo + batch]], pad_id=0), max_len)
                   for lo in range(0, n, batch)]
    elif layout == "grouped":
        batches = [collate_padded([data[i] for i in idx], pad_id=0) for idx in grouped_batches(data.lengths, batch, 0)]
    else:  # packed rows of max_len, padded to max_len: one static shape
        packed, rows = PackedDataset(data, max_len, seed=0), opts["packed_rows"]
        batches = [collate_packed([packed[r] for r in range(lo, min(lo + rows, len(packed)))], pad_id=0,
                                  width=max_len) for lo in range(0, len(packed), rows)]
    for b in batches:
        b["sup_index"], b["sup_targets"] = supervision(b["labels"])
        if layout == "grouped" and not opts["pad_mask"]:
            del b["attention_mask"]  # right padding + causal attention: real tokens never see a pad
        if layout == "pad-max":
            del b["attention_mask"]  # MiniMind calls model(input_ids, labels=labels) with no mask
    return batches


def run_sft_variant(opts: dict) -> dict:
    """Train one epoch of the SFT mix in one layout; time it after a compile warm-up (subprocess)."""
    from model.model_lora import lora_parameters

    device, dtype = torch.device(opts["device"]), getattr(torch, opts["dtype"])
    shape = SHAPES[opts["shape"]]
    torch.manual_seed(0)
    data = sft_dataset(opts["samples"], opts["seq"], shape["vocab_size"])
    batches = sft_batches(opts, data)
    if opts["stack"] == "minimind":  # MiniMind's own recipe: full-vocabulary logits, mean CE, plain LoRA, eager
        from model.model_lora import apply_lora
        from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

        with torch.device(device):
            model = MiniMindForCausalLM(MiniMindConfig(generation=3, **shape)).to(dtype)
        apply_lora(model, rank=opts["rank"], alpha=2 * opts["rank"], targets=opts["targets"])
        model.train()
        params = lora_parameters(model)

        def step(b: dict) -> torch.Tensor:
            loss = model(b["input_ids"], labels=b["labels"]).loss
            loss.backward()
            return loss.detach() * b["sup_targets"].numel()  # summed, so epochs compare token-weighted
    else:
        inner, params = build_ours(shape, opts, device, dtype)

        def step(b: dict) -> torch.Tensor:
            return inner(b) * b["sup_targets"].numel()
    on_gpu = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    if opts["compile"] and opts["layout"] == "grouped":  # one dynamic graph for every batch shape
        for b in on_gpu:
            for k in ("input_ids", "attention_mask"):
                if k in b:
                    torch._dynamo.mark_dynamic(b[k], 0)
                    torch._dynamo.mark_dynamic(b[k], 1)
    fresh = [p.detach().clone() for p in params]
    for b in on_gpu[: opts["warmup"]]:  # compile (and cuBLAS/allocator warm-up), then start over
        step(b)
    with torch.no_grad():
        for p, p0 in zip(params, fresh):
            p.copy_(p0)
            p.grad = None
    optimizer = torch.optim.AdamW(params, lr=opts["lr"], fused=device.type == "cuda")
    sync(device)
    t0 = time.perf_counter()
    total = torch.zeros((), device=device)
    for b in on_gpu:
        total += step(b)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    epoch_s = time.perf_counter() - t0
    supervised = sum(b["sup_targets"].numel() for b in batches)
    real = int(data.lengths.sum())
    slots = sum(b["input_ids"].numel() for b in batches)
    attn_pairs = int((data.lengths * (data.lengths + 1) // 2).sum())
    flops = flops_per_step(shape, real, supervised, attn_pairs, opts["rank"], opts["targets"])
    return dict(epoch_s=epoch_s, samples_per_s=len(data) / epoch_s, real_tokens_per_s=real / epoch_s,
                steps=len(batches), pad_frac=1 - real / slots, loss=total.item() / supervised,
                mfu=flops / epoch_s / (opts["peak_tflops"] * 1e12),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
                graphs=graph_count())


SFT_VARIANTS = {
    "minimind-pad-max": dict(stack="minimind", layout="pad-max", compile=False, fused_lora=False, fused_ce=False),
    "ours-pad-max": dict(stack="ours", layout="pad-max"),
    "ours-grouped": dict(stack="ours", layout="grouped"),
    "ours-grouped-mask": dict(stack="ours", layout="grouped", pad_mask=True),
    "ours-packed": dict(stack="ours", layout="packed"),
}


# ------------------------------------------------------------------------- driver

def prewarm(configs: list[dict], timeout: float) -> None:
    """Compile every compiled configuration at once, one process each, to fill the on-disk compile caches.

    Compilation is CPU work and the GPU is idle meanwhile, so doing it concurrently saves device time; the
    timed runs that follow, one at a time, then start from warm caches (their "1st step s" shrinks, and
    docs/PERF.md quotes the cold compile times separately).
    """
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                               json.dumps(dict(o, warmup=1, steps=1, samples=min(o.get("samples", 0), 512)))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for o in configs if o["compile"]]
    t0 = time.perf_counter()
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"  pre-warmed {len(procs)} compiled configurations in {time.perf_counter() - t0:.0f} s", flush=True)


def run_in_subprocess(opts: dict, timeout: float) -> dict:
    """Run one configuration in a fresh Python (clean CUDA peak memory); its last stdout line is the JSON."""
    t0 = time.perf_counter()
    if opts.get("inline"):  # --tiny: in this process, for speed (no GPU memory to keep apart)
        result = run_sft_variant(opts) if "layout" in opts else run_step_variant(opts)
        return dict(result, wall_s=time.perf_counter() - t0)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(opts)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return dict(error=("out of memory" if "OutOfMemory" in proc.stderr else err)[:200])
    if opts.get("profile"):
        print(proc.stderr, flush=True)
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def fmt(x: object, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else "-"


def print_step_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'variant':<16}{'tok/s':>9}{'vs peft-c':>10}{'step ms':>9}{'peak GiB':>9}{'MFU':>6}"
          f"{'1st step s':>11}{'loss0':>7}{'graphs':>7}")
    ref = next((r["tokens_per_s"] for r in rows if r["name"] == "peft-compile" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<16}  {r['error']}")
            continue
        rel = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        print(f"{r['name']:<16}{r['tokens_per_s']:>9.0f}{rel:>10}{r['step_ms']:>9.1f}{fmt(r['peak_gib'], '.1f'):>9}"
              f"{r['mfu']:>6.0%}{r['first_step_s']:>11.1f}{r['loss_first']:>7.2f}{r['graphs']:>7}")


def print_sft_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'variant':<19}{'samples/s':>10}{'epoch s':>9}{'speedup':>8}{'steps':>6}{'pad %':>6}{'loss':>8}"
          f"{'MFU':>6}{'peak GiB':>9}")
    ref = next((r["epoch_s"] for r in rows if r["name"] == "minimind-pad-max" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<19}  {r['error']}")
            continue
        rel = f"{ref / r['epoch_s']:.1f}x" if ref else "-"
        print(f"{r['name']:<19}{r['samples_per_s']:>10.0f}{r['epoch_s']:>9.2f}{rel:>8}{r['steps']:>6}"
              f"{r['pad_frac']:>6.0%}{r['loss']:>8.4f}{r['mfu']:>6.0%}{fmt(r['peak_gib'], '.2f'):>9}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's command lines as written and shows each flag's default."""


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run each configuration in its own process, print the table(s), optionally save JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    g = p.add_argument_group("what to run")
    g.add_argument("--shape", default="qwen3-0.6b", choices=[s for s in SHAPES if s != "tiny"],
                   help="model shape, random weights (default qwen3-0.6b)")
    g.add_argument("--variants", default=None, help=f"comma list from {', '.join(VARIANTS)} (sft: {', '.join(SFT_VARIANTS)})"
                   f"; default {DEFAULT_VARIANTS} (sft: all); NAME:key=value,key=value overrides an option")
    g.add_argument("--sft-mix", action="store_true", help="the SFT length-mix epoch table (shape minimind3-64m)")
    g.add_argument("--max-batch", action="store_true", help="largest --batch that fits, per variant, at --seq")
    g.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, a few steps, both tables")
    g = p.add_argument_group("step settings")
    g.add_argument("--batch", type=int, default=8, help="rows per step (sft: samples, or packed rows / 5)")
    g.add_argument("--seq", type=int, default=1024, help="tokens per row (sft: max_seq_len)")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 × rank)")
    g.add_argument("--prompt-frac", type=float, default=0.4, help="leading share of each row labelled -100")
    g.add_argument("--warmup", type=int, default=3, help="untimed first steps, compiles included")
    g.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    g.add_argument("--samples", type=int, default=8192, help="sft: samples in the epoch")
    g.add_argument("--dtype", default="bfloat16", help="the base's weights (bfloat16, float16, float32)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when there is one, else cpu")
    g.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 matmul rate")
    g.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    g.add_argument("--json", help="write all results here (rewritten after every configuration)")
    g.add_argument("--prewarm", action="store_true", help="compile all compiled configurations concurrently first")
    g.add_argument("--profile", default="", help="comma list of variants whose top CUDA kernels (2 steps) to print")
    args = p.parse_args(argv)

    if args.worker:
        opts = json.loads(args.worker)
        result = run_sft_variant(opts) if "layout" in opts else run_step_variant(opts)
        print(json.dumps(result))
        return 0

    if args.tiny:
        args.shape, args.device, args.dtype, args.batch, args.seq = "tiny", "cpu", "float32", 2, 64
        args.warmup, args.steps, args.samples, args.peak_tflops = 1, 2, 16, 1.0
    base = dict(shape=args.shape, batch=args.batch, seq=args.seq, rank=args.rank, prompt_frac=args.prompt_frac,
                warmup=args.warmup, steps=args.steps, dtype=args.dtype, device=args.device,
                peak_tflops=args.peak_tflops)
    results: dict = {"settings": base, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}

    def parse(spec: str, table: dict) -> tuple[str, dict]:
        name, _, over = spec.partition(":")
        opts = dict(table[name])
        for kv in filter(None, over.split(",")):
            k, v = kv.split("=")
            opts[k] = json.loads(v) if v[:1] in "0123456789-tf[{\"" else v
        return spec, opts

    if args.sft_mix or args.tiny:
        sft = dict(base, shape="tiny" if args.tiny else "minimind3-64m", batch=32 if not args.tiny else 4,
                   packed_rows=6 if not args.tiny else 1, targets="q_proj,o_proj", lr=5e-4, pad_mask=False,
                   compile_mode=None, autocast=False,  # as in the SFT-mix runs of docs/PERF.md; padded layouts vary in shape
                   samples=args.samples, warmup=args.warmup)
        names = args.variants.split(",") if args.variants and args.sft_mix else list(SFT_VARIANTS)
        configs = [(name, {**DEFAULTS, **sft, **opts}) for name, opts in (parse(s, SFT_VARIANTS) for s in names)]
        if args.tiny:
            for _, opts in configs:
                opts.update(compile=False, inline=True)
        if args.prewarm:
            prewarm([o for _, o in configs], args.timeout)
        rows = results["sft_mix"] = []
        for name, opts in configs:
            rows.append(dict(name=name, **run_in_subprocess(opts, args.timeout)))
            print(f"  {name}: {rows[-1]}", flush=True)
            save(args.json, results)
        print_sft_table(rows, f"SFT length mix, {sft['shape']}, {args.samples} samples, max_seq_len {args.seq}, "
                              f"batch {sft['batch']} samples ({sft['packed_rows']} rows packed), LoRA r{args.rank} q/o")
    if not args.sft_mix or args.tiny:
        names = (args.variants or DEFAULT_VARIANTS).split(",")
        if args.tiny:
            names = ["peft", "ours-eager", "ours"]
        configs = [(name, {**DEFAULTS, **base, **opts, "profile": name in args.profile.split(",")})
                   for name, opts in (parse(s, VARIANTS) for s in names)]
        if args.tiny:
            for _, opts in configs:
                opts.update(compile=False, inline=True)
        if args.prewarm and not args.max_batch:
            prewarm([o for _, o in configs], args.timeout)
        rows = results["steps" if not args.max_batch else "max_batch"] = []
        for name, opts in configs:
            if args.max_batch:
                rows.append(dict(name=name, **max_batch(opts, args.timeout)))
            else:
                rows.append(dict(name=name, **run_in_subprocess(opts, args.timeout)))
            print(f"  {name}: {rows[-1]}", flush=True)
            save(args.json, results)
        if args.max_batch:
            print(f"\nlargest batch at seq {args.seq} ({args.shape}):")
            for r in rows:
                print(f"{r['name']:<16} batch {r.get('batch')}  ({r.get('tokens_per_s', 0):.0f} tok/s, "
                      f"{r.get('peak_gib', 0):.1f} GiB)")
        else:
            print_step_table(rows, f"{args.shape}, batch {args.batch} x {args.seq}, LoRA r{args.rank}, {args.dtype}, "
                                   f"{int(args.prompt_frac * 100)}% prompt, {results['device']}, "
                                   f"median of {args.steps} steps")
    save(args.json, results)
    return 0


def save(path: str | None, results: dict) -> None:
    """Write the results so far as JSON (if --json was given)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1) + "\n")


def max_batch(opts: dict, timeout: float) -> dict:
    """Double the batch until a step runs out of memory, then bisect; returns the largest that ran."""
    good, bad, last = None, None, {}
    b = opts["batch"]
    while bad is None or (good or 0) + 1 < bad:
        r = run_in_subprocess(dict(opts, batch=b, warmup=2, steps=2), timeout)
        if "error" in r:
            bad = b
        else:
            good, last = b, r
        if bad is None:
            b *= 2
        elif good is None:
            if b == 1:
                break
            b = max(1, b // 2)
        else:
            if bad - good <= max(1, good // 8):  # within 12%: close enough for a quick search
                break
            b = (good + bad) // 2
    return dict(batch=good, tokens_per_s=last.get("tokens_per_s", 0), peak_gib=last.get("peak_gib", 0))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
