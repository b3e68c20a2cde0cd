"""The uncompiled padded step (`--packing 0 --use_compile 0`) through the trainer's own train_step: ms per step.

    python scripts/bench/eager_step.py                              # Qwen3-0.6B shape, 8 rows, widths 640 and 1024
    PYTHONPATH=/path/to/other/checkout python scripts/bench/eager_step.py   # the same for another version
    python scripts/bench/eager_step.py --cuda_graphs 1              # through the trainer's CUDA graphs

The model is built as trainer/train_lora.py builds it on that device (bf16 base, fused LoRA r16 on every
linear layer, autocast bf16 on a GPU; fp32 on a CPU), random weights. Each width is one padded batch of
`--batch` rows, the first full and the others of random lengths, trained for `--warmup` steps and then timed
over `--steps`. That eager step is bound by the host (operators and autograd nodes per layer), so its time per
step is what a change there moves; tokens/s counts the real (unpadded) tokens. To compare two versions, run
both on one machine, alternated.
"""

import argparse
import contextlib
import json
import time
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scripts.bench_lora import SHAPES


def padded_batch(shape: dict, rows: int, width: int, g: torch.Generator) -> tuple[dict, int]:
    """A padded micro-batch as the data pipeline sends it (first quarter prompt), and its real token count."""
    from trainer.loss import IGNORE_INDEX, supervision

    ids = torch.randint(0, shape["vocab_size"], (rows, width), generator=g)
    lengths = torch.randint(width // 3, width + 1, (rows,), generator=g)
    lengths[0] = width
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, : width // 4] = IGNORE_INDEX
    sup_index, sup_targets = supervision(labels)
    return dict(input_ids=ids, attention_mask=mask, sup_index=sup_index, sup_targets=sup_targets), int(mask.sum())


def main(argv: list[str] | None = None) -> int:
    """Time the eager step at each width; print one line per width (and write --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the step runs (default: cuda when there is one, else cpu)")
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES), help="model shape (bench_lora's)")
    p.add_argument("--widths", default="640,1024", help="comma-separated padded widths, one batch each")
    p.add_argument("--batch", type=int, default=8, help="rows per micro-batch (default 8)")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps per width (default 4)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per width (default 12)")
    p.add_argument("--cuda_graphs", type=int, default=0, choices=[0, 1],
                   help="1: run the micro-batch through its CUDA graph, as the trainer's uncompiled GPU default "
                        "(trainer/step_graphs.py); 0 (default): plain eager")
    p.add_argument("--sdpa", default="auto", choices=["auto", "flash"],
                   help="attention backends SDPA may pick: auto (default, torch's choice; cuDNN on an H200) or "
                        "flash (Flash, then memory-efficient, then math)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from model.model_lora import apply_lora, lora_parameters, set_lora_fused
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from trainer.distributed import DistInfo, FlatGradients
    from trainer.engine import forward_backward, make_optimizer, train_step
    from trainer.loss import SupervisedLoss
    from trainer.step_graphs import MicroStepGraphs

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    with device:
        model = MiniMindForCausalLM(MiniMindConfig(generation=3, **shape)).to(dtype)
    apply_lora(model, rank=16)
    if gpu:
        set_lora_fused(model)  # as train_lora.py on a GPU
    model.train()
    loss_module = SupervisedLoss(model)
    params = lora_parameters(model)
    flat_grads = FlatGradients(params)
    optimizer = make_optimizer(params, 1e-4, 0.0, flat_grads)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    graphs = (MicroStepGraphs(partial(forward_backward, loss_module, device=device, amp_dtype=dtype), device)
              if args.cuda_graphs else None)
    flash = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if gpu else "cpu",
               "shape": args.shape, "batch": args.batch, "cuda_graphs": args.cuda_graphs, "sdpa": args.sdpa,
               "widths": {}}
    g = torch.Generator().manual_seed(1)
    for width in (int(w) for w in args.widths.split(",")):
        batch, n_tokens = padded_batch(shape, args.batch, width, g)

        def run(n: int, batch: dict = batch) -> float:
            with contextlib.nullcontext() if args.sdpa == "auto" else sdpa_kernel(flash):
                for _ in range(n):
                    loss, _ = train_step(loss_module, [batch], batch["sup_targets"].numel(), info, optimizer, None,
                                         params, 1e-4, 1.0, dtype, flat_grads, graphs)
            return float(loss)  # a host sync: the steps are done

        run(args.warmup)
        start = time.perf_counter()
        loss = run(args.steps)
        seconds = (time.perf_counter() - start) / args.steps
        row = {"ms_per_step": round(seconds * 1e3, 1), "tokens_per_s": round(n_tokens / seconds), "loss": round(loss, 4)}
        results["widths"][width] = row
        print(f"{args.batch} x {width}: {row['ms_per_step']} ms per step, {row['tokens_per_s']:,} tokens/s, "
              f"loss {row['loss']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
