"""All-reduce time at LoRA gradient sizes between the GPUs of one host (decides trainer/engine.py's DDP settings).

    torchrun --nproc_per_node 2 scripts/bench/allreduce.py

A LoRA step all-reduces only the adapters' gradients (10M fp32 values = 40 MB at the Qwen3-0.6B shape, r16,
all linear). Whether that hides behind the backward pass depends on the link between the GPUs, which this
prints (NCCL's transport shows with NCCL_DEBUG=INFO) together with the median time and bus bandwidth of one
all-reduce per size and dtype.
"""

import argparse
import os
import statistics

import torch
import torch.distributed as dist


def main() -> None:
    """Time all_reduce for a few sizes on every rank; rank 0 prints the table."""
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        print(f"{world} ranks; size MB, dtype, median ms, bus GB/s (2(n-1)/n x bytes / time)")
    for mb in (1, 5, 25, 40, 160):
        for dtype in (torch.float32, torch.bfloat16):
            n = mb * 2**20 // torch.tensor([], dtype=dtype).element_size()
            t = torch.ones(n, dtype=dtype, device="cuda")
            times = []
            for i in range(25):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dist.all_reduce(t)
                end.record()
                torch.cuda.synchronize()
                if i >= 5:
                    times.append(start.elapsed_time(end))
            ms = statistics.median(times)
            bus = 2 * (world - 1) / world * mb * 2**20 / (ms / 1e3) / 1e9
            if dist.get_rank() == 0:
                print(f"{mb:>5} MB {str(dtype)[6:]:>9} {ms:8.3f} ms {bus:7.1f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
