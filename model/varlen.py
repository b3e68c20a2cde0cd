"""Causal attention inside each sample of packed rows, given the samples' boundaries (`cu_seqlens`).

Packed rows hold several samples each. The dense block-diagonal mask makes SDPA compute every pair of a
row and read the mask, with repeated kv heads; Flash attention's varlen kernel takes the rows as one
sequence cut at `cu_seqlens` and computes only the pairs inside each sample, reading the shared kv heads
as they are (docs/PERF.md, "Attention"). `cu_seqlens` may end in repeated values: empty samples, so that
its length stays the same from step to step (compiled graphs and CUDA graphs keep one shape).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PackedSegments(NamedTuple):
    """Where the samples of packed rows start: `cu_seqlens` [S+1] int32 offsets into the flattened [B*T]
    rows (0 first, B*T last, repeated values = empty samples), and `max_len`, the longest sample allowed."""

    cu_seqlens: torch.Tensor
    max_len: int


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9
    varlen_attn = None
# How this torch spells causal and GQA in varlen_attn (the keywords changed across releases); read once here,
# not in the compiled forward.
_PARAMS = inspect.signature(varlen_attn).parameters if varlen_attn is not None else {}
_CAUSAL = {"is_causal": True} if "is_causal" in _PARAMS else {"window_size": (-1, 0)}
_GQA_FLAG = "enable_gqa" in _PARAMS


VARLEN_DTYPES = (torch.bfloat16, torch.float16)  # the kernel's only dtypes


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed rows can attend through the varlen kernel: CUDA, torch's varlen_attn, and q/k/v in
    one of VARLEN_DTYPES (`dtype` is the autocast dtype)."""
    return device.type == "cuda" and dtype in VARLEN_DTYPES and varlen_attn is not None


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments) -> torch.Tensor:
    """Causal attention within each segment. q [N, H, D], k / v [N, KV, D] (KV divides H) -> [N, H, D].

    On CUDA this is Flash attention's varlen kernel. Elsewhere it is one SDPA call per segment (a host
    loop, for tests and CPUs, where the trainer keeps the dense mask).
    """
    if q.is_cuda:
        if torch.is_autocast_enabled("cuda"):  # as autocast casts SDPA's inputs (an fp32 base under fp16/bf16)
            dtype = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if k.shape[1] != q.shape[1] and torch.compiler.is_compiling():
            # Flash's own GQA backward sums dk/dv over the heads that share a kv head in a separate, slow
            # reduction; with the heads repeated here, Inductor folds that sum into the rope's backward.
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = {"enable_gqa": True} if _GQA_FLAG and k.shape[1] != q.shape[1] else {}
        cu, n = segments.cu_seqlens, segments.max_len
        return varlen_attn(q, k, v, cu, cu, n, n, **_CAUSAL, **gqa)
    n_rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = segments.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
            ks, vs = ks.repeat_interleave(n_rep, dim=0), vs.repeat_interleave(n_rep, dim=0)
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


def sample_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Where the samples of packed rows start ([B, T] bool): wherever the position does not continue by +1
    (e.g. back at 0), and at every row's first token. No data-dependent branch (compile-friendly)."""
    return torch.diff(position_ids, dim=-1, prepend=position_ids[..., :1]) != 1


def cu_seqlens_of(position_ids: torch.Tensor, slots: int | None = None) -> torch.Tensor:
    """Segment offsets of packed rows from their positions (`sample_starts`), padded with the total to
    `slots` + 1 entries. int32, on the positions' device. Runs on the CPU in the data pipeline (it has a
    data-dependent size)."""
    n = position_ids.numel()
    offsets = sample_starts(position_ids).reshape(-1).nonzero().flatten()
    count = offsets.numel()
    slots = max(slots or count, count)  # more segments than slots: a longer tensor (and a recompile), not wrong
    cu = torch.full((slots + 1,), n, dtype=torch.int32, device=position_ids.device)
    cu[:count] = offsets.to(torch.int32)
    return cu
