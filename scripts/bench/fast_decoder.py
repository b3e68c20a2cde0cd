"""Model directories on the fast decoder: against MiniMind's own directory, and against transformers + PEFT.

    python scripts/bench/fast_decoder.py --json out/fast_decoder.json          # one GPU

Writes random-weight bf16 directories to --work: a Qwen3-0.6B-shaped transformers Qwen3 directory, the same
weights (the same safetensors file) as a MiniMind directory, and a Llama-3.2-1B-shaped Llama directory (llama3
rope scaling, tied head). Each is loaded as the trainer loads it (trainer/base_model.load_directory) and trained in
its own process for --warmup + --steps LoRA steps of scripts/bench_lora.py's `ours` step (bf16, fused LoRA, fused
linear CE, fused AdamW; rows of one sequence each), the decoder compiled per layer (--compile blocks, fast to
compile, but a host-bound step that can differ by 10% from one process to the next: --repeats alternates the
variants; "layers" adds CUDA graphs, as the trainer's default; "whole" is one graph with CUDA graphs). The Llama
directory also runs through transformers' LlamaForCausalLM + PEFT + torch.compile (bench_lora's `peft-compile`
step). Tokens/s is the median step, peak memory torch.cuda.max_memory_allocated, MFU bench_lora's count of
necessary FLOPs over --peak-tflops.

    python scripts/bench/fast_decoder.py --variants "qwen3-0.6b minimind-dir,qwen3-0.6b qwen3-dir" \
        --compile layers --interleave 12

--interleave R loads the variants into one process and alternates them there, --steps steps each per round for R
rounds, the order swapped every round: drift of the machine's speed over the call then hits every variant alike.
Each row then also holds its per-round medians and the first variant's per-round step over its own.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from scripts.bench_lora import SHAPES, flops_per_step, graph_count, random_batches, timed_steps

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                max_position_embeddings=131072, tie_word_embeddings=True)
LLAMA_1B_ROPE = dict(rope_type="llama3", rope_theta=5e5, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
VARIANTS = {  # name: (directory, stack)
    "qwen3-0.6b minimind-dir": ("minimind_qwen3_06b", "ours"),
    "qwen3-0.6b qwen3-dir": ("qwen3_06b", "ours"),
    "llama-3.2-1b llama-dir": ("llama32_1b", "ours"),
    "llama-3.2-1b peft-compile": ("llama32_1b", "peft"),
}


def write_directories(work: Path, tiny: bool, device: str) -> None:
    """The three random-weight directories (kept if already there)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config

    from model.hf_compat import rope_config_kwargs
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

    torch.manual_seed(0)
    shape = SHAPES["tiny" if tiny else "qwen3-0.6b"]
    llama_shape = dict(LLAMA_1B, **{k: v for k, v in SHAPES["tiny"].items() if tiny})
    if not (work / "qwen3_06b" / "config.json").is_file():
        with torch.device(device):
            mm = MiniMindForCausalLM(MiniMindConfig(generation=3, rope_theta=1e6, rms_norm_eps=1e-6, **shape))
        mm.to(torch.bfloat16).save_pretrained(work / "minimind_qwen3_06b")
        del mm
        qwen = work / "qwen3_06b"
        qwen.mkdir(parents=True, exist_ok=True)
        Qwen3Config(**shape, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
                    **rope_config_kwargs(dict(rope_type="default", rope_theta=1e6)),
                    architectures=["Qwen3ForCausalLM"], dtype="bfloat16").save_pretrained(qwen)
        shutil.copyfile(work / "minimind_qwen3_06b" / "model.safetensors", qwen / "model.safetensors")
    if not (work / "llama32_1b" / "config.json").is_file():
        with torch.device(device):
            llama = LlamaForCausalLM(LlamaConfig(**llama_shape, **rope_config_kwargs(LLAMA_1B_ROPE)))
        llama.to(torch.bfloat16).save_pretrained(work / "llama32_1b")


def shape_of(config: object) -> dict:
    """The sizes flops_per_step reads, from a transformers or MiniMind config."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size")
    shape = {k: getattr(config, k) for k in keys}
    shape["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return shape


def build(opts: dict, device: torch.device) -> tuple:
    """(step function, LoRA params, model config) for one variant."""
    dtype = torch.bfloat16
    if opts["stack"] == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(opts["path"], dtype=dtype, attn_implementation="sdpa").to(device)
        config = model.config
        model = get_peft_model(model, LoraConfig(r=opts["rank"], lora_alpha=2 * opts["rank"], lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        run = torch.compile(model) if opts["compile"] != "none" else model

        def step(batch: dict) -> torch.Tensor:
            loss = run(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            return loss.detach()

        return step, [p for p in model.parameters() if p.requires_grad], config

    from model.model_lora import apply_lora, lora_parameters, set_lora_fused
    from trainer.base_model import load_directory
    from trainer.compiling import compile_decoder
    from trainer.loss import SupervisedLoss

    model = load_directory(Path(opts["path"]), dtype, max_seq_len=opts["seq"]).to(device)
    print(f"loaded as {type(model).__name__}", flush=True)
    apply_lora(model, rank=opts["rank"], alpha=2 * opts["rank"], targets="all-linear")
    set_lora_fused(model, True)
    model.train()
    if opts["compile"] == "blocks":
        for layer in model.model.layers:
            layer.compile(fullgraph=True)
    elif opts["compile"] != "none":
        compile_decoder(model, cuda_graphs=True, per_layer=opts["compile"] == "layers")
    loss_module = SupervisedLoss(model, fused=True)

    def step(batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype):
            ce, aux = loss_module(batch["input_ids"], batch["sup_index"], batch["sup_targets"])
        loss = ce / batch["sup_targets"].numel() + aux
        loss.backward()
        return loss.detach()

    return step, lora_parameters(model), model.config


def summary(ms: list[float], losses: list[torch.Tensor], first_step_s: float, batches: list, config: object,
            opts: dict) -> dict:
    """One row of the table from a variant's timed steps."""
    step_ms = statistics.median(ms)
    tokens, supervised = batches[0]["input_ids"].numel(), batches[0]["sup_targets"].numel()
    flops = flops_per_step(shape_of(config), tokens, supervised, opts["batch"] * opts["seq"] * (opts["seq"] + 1) // 2,
                           opts["rank"], "all-linear")
    return dict(tokens_per_s=tokens / step_ms * 1e3, step_ms=step_ms, step_ms_spread=max(ms) - min(ms),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
                mfu=flops / (step_ms / 1e3) / (opts["peak_tflops"] * 1e12), first_step_s=first_step_s,
                loss_first=losses[0].item(), loss_last=losses[-1].item(), graphs=graph_count())


def start(opts: dict, device: torch.device) -> dict:
    """Build one variant: its step function, optimizer and batches."""
    torch.manual_seed(0)
    step, params, config = build(opts, device)
    fused = True if opts["stack"] == "ours" and device.type == "cuda" else None
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    batches = random_batches(shape_of(config), opts["batch"], opts["seq"], 0.4, 4, device)
    return dict(step=step, optimizer=optimizer, batches=batches, config=config, ms=[], losses=[], rounds=[])


def run_worker(opts: dict) -> dict:
    """Load, train warmup + steps, return the timings (in its own process)."""
    device = torch.device(opts["device"])
    m = start(opts, device)
    ms, losses, first_step_s = timed_steps(m["step"], m["optimizer"], m["batches"], opts["warmup"], opts["steps"],
                                           device)
    return summary(ms, losses, first_step_s, m["batches"], m["config"], opts)


def run_interleaved(all_opts: list[dict], rounds: int) -> list[dict]:
    """All variants in this process, alternated: per round, --steps timed steps of each (after one untimed step
    that switches the CUDA graphs over), the order reversed every other round. Peak memory holds them all."""
    device = torch.device(all_opts[0]["device"])
    models = [start(opts, device) for opts in all_opts]
    for m, opts in zip(models, all_opts):  # at least one step: it compiles and records
        _, m["losses"], m["first_step_s"] = timed_steps(m["step"], m["optimizer"], m["batches"],
                                                        max(opts["warmup"], 1), 0, device)
    for r in range(rounds):
        for m in models if r % 2 == 0 else models[::-1]:
            ms, losses, _ = timed_steps(m["step"], m["optimizer"], m["batches"], 1, all_opts[0]["steps"], device)
            m["ms"] += ms
            m["losses"] += losses
            m["rounds"].append(statistics.median(ms))
    first = models[0]["rounds"]
    return [dict(summary(m["ms"], m["losses"], m["first_step_s"], m["batches"], m["config"], opts),
                 round_ms=[round(x, 2) for x in m["rounds"]],
                 vs_first_by_round=[round(a / b, 4) for a, b in zip(first, m["rounds"])])
            for m, opts in zip(models, all_opts)]


def main(argv: list[str] | None = None) -> int:
    """Write the directories, run each variant in its own process, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", default="/tmp/fast_decoder_bench", help="where the model directories are written")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row (default 1024)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on every linear (alpha = 2 x rank)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps, compiles included (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, median reported (default 10)")
    p.add_argument("--compile", choices=("blocks", "layers", "whole", "none"), default="blocks",
                   help="blocks: each layer compiled; layers: the same with CUDA graphs (the trainer's way); "
                        "whole: the decoder one graph with CUDA graphs; none: eager (default blocks)")
    p.add_argument("--interleave", type=int, default=0, metavar="R",
                   help="alternate the variants in one process for R rounds (see above)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes, no compile, 2 steps")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 matmul rate")
    p.add_argument("--repeats", type=int, default=1, help="run the variant list this many times, alternating")
    p.add_argument("--timeout", type=float, default=300, help="seconds per variant (default 300)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.worker:
        opts = json.loads(args.worker)
        rows = run_interleaved(opts, args.interleave) if isinstance(opts, list) else run_worker(opts)
        print(json.dumps(rows))
        return 0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        device, args.batch, args.seq, args.warmup, args.steps, args.compile = "cpu", 2, 64, 1, 2, "none"
    work = Path(args.work)
    t0 = time.perf_counter()
    write_directories(work, args.tiny, device)
    print(f"directories written in {time.perf_counter() - t0:.0f} s", flush=True)
    results = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", settings=vars(args), rows=[])

    def opts_of(name: str) -> dict:
        folder, stack = VARIANTS[name]
        return dict(path=str(work / folder), stack=stack, batch=args.batch, seq=args.seq, rank=args.rank,
                    warmup=args.warmup, steps=args.steps, compile=args.compile, peak_tflops=args.peak_tflops,
                    device=device)

    names = args.variants.split(",")
    jobs = [([n], opts_of(n)) for n in names * args.repeats]
    if args.interleave:
        jobs = [(names, [opts_of(n) for n in names])]
    for job_names, opts in jobs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(opts),
               "--interleave", str(args.interleave)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            out = proc.stdout.strip().splitlines()
            rows = json.loads(out[-1]) if proc.returncode == 0 else \
                dict(error=(proc.stderr.strip().splitlines() or ["?"])[-1][:300])
        except subprocess.TimeoutExpired:
            rows = dict(error=f"timed out after {args.timeout:.0f} s")
        for name, row in zip(job_names, rows if isinstance(rows, list) else [rows] * len(job_names)):
            row = dict(name=name, **row)
            row["log"] = [line for line in out if line.startswith(("model:", "loaded as"))] if "error" not in row else []
            results["rows"].append(row)
            print(f"  {name}: {row}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{results['device']}, batch {args.batch} x {args.seq}, LoRA r{args.rank} all linear, bf16, 40% prompt, "
          f"compile {args.compile}, median of {args.steps} steps")
    print(f"{'variant':<28}{'tok/s':>9}{'step ms':>9}{'spread':>7}{'peak GiB':>9}{'MFU':>6}{'1st step s':>11}"
          f"{'loss0':>7}")
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['name']:<28}  {r['error']}")
            continue
        print(f"{r['name']:<28}{r['tokens_per_s']:>9.0f}{r['step_ms']:>9.1f}{r['step_ms_spread']:>7.1f}"
              f"{r['peak_gib']:>9.1f}{r['mfu']:>6.0%}"
              f"{r['first_step_s']:>11.1f}{r['loss_first']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
