"""Attention kernels for our two layouts, forward + backward, on one GPU (decides model_minimind's paths).

    python scripts/bench/attention.py

Full causal rows (the fixed-shape benchmark) and packed rows (documents of the SFT mix's lengths, attention
kept inside each document), at the Qwen3-0.6B head layout (rows of 1024, and of 512 as the trainer packs by
default) and at minimind3-64m's. Flash's varlen kernel runs with the samples' boundaries padded by empty
segments to 1, 2 and 4 times their number (the trainer pads them to a count fixed for the run). Prints ms per
call, the GPU kernels' own ms per call, and TFLOP/s of those kernels over the causal pairs that each layout
really needs.
"""

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.varlen import PackedSegments, attend_segments, varlen_available
from scripts.bench_lora import sft_lengths


def bench(fn: Callable[[], None], reps: int = 20, rounds: int = 5) -> float:
    """ms per call of fn() (forward + backward), after warm-up: the median over `rounds` of `reps` calls run back
    to back between two CUDA events. That is the GPU's time wherever the host keeps ahead of it, as in a
    compiled, graphed step; one synchronized call would add the host's dispatch to it."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / reps)
    return statistics.median(times)


def kernel_ms(fn: Callable[[], None], reps: int = 10) -> float:
    """GPU kernel time per call of fn(), summed from the profiler's kernel records: no host time in it, where a
    host-bound eager call (a custom op's Python dispatch) hides the kernels from `bench`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3 / reps


def doc_lengths(rows: int, width: int, seed: int = 0) -> list[list[int]]:
    """Rows of whole documents (SFT-mix lengths, greedy fill), the rest of each row one pad document."""
    lengths, _ = sft_lengths(rows * 20, width, seed)
    out, it = [], iter(lengths.tolist())
    for _ in range(rows):
        row, free = [], width
        for n in it:
            if n > free:
                break
            row.append(n)
            free -= n
        out.append(row + ([free] if free else []))
    return out


def shape_rows(name: str, B: int, T: int, H: int, KV: int, D: int) -> list[tuple]:
    """(shape, kernel, ms, TFLOP/s) for every kernel at one head layout."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    rep = H // KV
    docs = doc_lengths(B, T)
    doc_id = torch.tensor(np.concatenate([np.repeat(np.arange(len(r)), r) for r in docs]), device="cuda").view(B, T)

    def repeat_kv(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(rep, dim=1)

    def forced(backend: SDPBackend) -> Callable[[], torch.Tensor]:
        def go() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), is_causal=True)
        return go

    causal_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T)
    causal = {
        "sdpa causal, kv repeated (now)": lambda: F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v),
                                                                                 is_causal=True),
        "sdpa causal, enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa causal, flash forced": forced(SDPBackend.FLASH_ATTENTION),
        "sdpa causal, cudnn forced": forced(SDPBackend.CUDNN_ATTENTION),
        "sdpa causal, efficient forced": forced(SDPBackend.EFFICIENT_ATTENTION),
        "flex causal": lambda: flex(q, k, v, block_mask=causal_mask, enable_gqa=True),
    }
    dense = (doc_id[:, :, None] == doc_id[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device="cuda").tril()

    def doc_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        return (qi >= ki) & (doc_id[b, qi] == doc_id[b, ki])

    doc_mask = create_block_mask(doc_mod, B, None, T, T)
    packed = {
        "packed: sdpa dense bool mask, kv repeated (now)":
            lambda: F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=dense[:, None]),
        "packed: flex document mask": lambda: flex(q, k, v, block_mask=doc_mask, enable_gqa=True),
        "packed: flex, mask built each call": lambda: flex(q, k, v, block_mask=create_block_mask(
            doc_mod, B, None, T, T), enable_gqa=True),
    }
    if varlen_available(q.device, q.dtype):
        ends = np.cumsum([n for r in docs for n in r])
        for slots in (len(ends), 2 * len(ends), 4 * len(ends)):  # as many as samples, then padded with empty ones
            cu = torch.tensor(np.concatenate([[0], ends, [B * T] * (slots - len(ends))]), dtype=torch.int32,
                              device="cuda")
            packed[f"packed: varlen kernel, {slots} segment slots"] = partial(varlen, q, k, v, cu, T)
    def fwd_bwd(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def go() -> None:
            q.grad = k.grad = v.grad = None
            f().backward(do)
        return go

    rows = []
    pairs = {"causal": B * T * (T + 1) // 2, "packed": sum(n * (n + 1) // 2 for r in docs for n in r)}
    for layout, variants in (("causal", causal), ("packed", packed)):
        for label, f in variants.items():
            try:
                ms, kernels = bench(fwd_bwd(f)), kernel_ms(fwd_bwd(f))
                tflops = 3 * 4 * H * D * pairs[layout] / (kernels / 1e3) / 1e12
                rows.append((name, label, f"{ms:8.3f}", f"{kernels:8.3f}", f"{tflops:6.0f}"))
            except Exception as e:  # a backend that refuses this shape is a result too
                rows.append((name, label, "  failed", "", str(e).splitlines()[0][:60]))
            print(*rows[-1], flush=True)
    return rows


def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, width: int) -> torch.Tensor:
    """model.varlen's attention over [B, heads, T, D] rows cut at `cu` (the trainer's packed path)."""
    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]
    return attend_segments(*flat, PackedSegments(cu, width)).view(B, T, H, D).transpose(1, 2)


def main() -> None:
    """Both head layouts, then the table."""
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    rows = (shape_rows("qwen3-0.6b", 8, 1024, 16, 8, 128) + shape_rows("qwen3-0.6b 512", 8, 512, 16, 8, 128)
            + shape_rows("minimind3-64m", 6, 1024, 8, 4, 96))
    print(f"\n{'shape':<17}{'attention fwd+bwd':<50}{'ms':>9}{'kernels':>9}{'TFLOP/s':>8}")
    for r in rows:
        print(f"{r[0]:<17}{r[1]:<50}{r[2]:>9}{r[3]:>9}{r[4]:>8}")


if __name__ == "__main__":
    main()
