"""Packed rows attending through their samples' boundaries (`cu_seqlens`, model/varlen.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.model_lora import lora_parameters
from model.varlen import PackedSegments, attend_segments, cu_seqlens_of
from tests.test_fast_defaults import _Lengths
from tests.test_fast_paths import packed_batch, tiny_model
from trainer.data import SEGMENT_MULTIPLE, prepare_data
from trainer.distributed import DistInfo
from trainer.loss import SupervisedLoss

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_cu_seqlens_mark_every_sample_and_every_row_start():
    # Row 0: samples of 3 and 2, then a pad segment of 1 (positions restart). Row 1: one sample of 6: its
    # start is a boundary though its position 0 follows row 0's last position 0 (not +1).
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert cu_seqlens_of(position_ids).tolist() == [0, 3, 5, 6, 12]
    # Padded to a fixed number of slots with empty segments at the end.
    assert cu_seqlens_of(position_ids, slots=6).tolist() == [0, 3, 5, 6, 12, 12, 12]
    # Two rows that each continue the other's positions are still cut at the row start.
    assert cu_seqlens_of(torch.tensor([[0, 1], [2, 3]])).tolist() == [0, 2, 4]
    # Too few slots: all boundaries anyway (a longer tensor, never a merged sample).
    assert cu_seqlens_of(position_ids, slots=2).tolist() == [0, 3, 5, 6, 12]


def packed_loss_and_grads(cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = tiny_model().double()
    b = packed_batch()
    ce, _ = SupervisedLoss(model)(b["input_ids"], b["sup_index"], b["sup_targets"], position_ids=b["position_ids"],
                                  cu_seqlens=cu_seqlens)
    ce.backward()
    return ce.detach(), [p.grad for p in lora_parameters(model)]


def test_segments_give_the_dense_block_mask_loss_and_gradients():
    """The decoder attending through cu_seqlens (here the per-sample SDPA that stands in for the CUDA kernel,
    GQA with 4 query and 2 kv heads, float64) gives the loss and LoRA gradients of the dense block-diagonal
    mask built from the positions; one segment per row (plain causal rows) gives another loss."""
    position_ids = packed_batch()["position_ids"]
    want_ce, want_grads = packed_loss_and_grads(None)
    ce, grads = packed_loss_and_grads(cu_seqlens_of(position_ids, slots=12))
    torch.testing.assert_close(ce, want_ce, rtol=1e-12, atol=0)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    rows_only, _ = packed_loss_and_grads(torch.tensor([0, 20, 40, 60], dtype=torch.int32))
    assert (rows_only - want_ce).abs() > 1e-3


def test_segments_refuse_a_padding_mask():
    model = tiny_model()
    b = packed_batch()
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.model(b["input_ids"], attention_mask=torch.ones_like(b["input_ids"]),
                    cu_seqlens=cu_seqlens_of(b["position_ids"]))


def test_packed_micro_batches_carry_boundaries_of_one_length_that_match_their_positions():
    """With `segments`, every packed micro-batch of two epochs on each of 2 ranks carries cu_seqlens of the same
    length (one compiled shape), and its non-empty segments are exactly the samples and pad segments of its rows.
    That length is sized from the first epoch's fullest micro-batch, not from its fullest row times the rows:
    Flash's varlen kernel pays for empty slots."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000).tolist()
    args = SimpleNamespace(data_path="x", val_data_path=None, val_fraction=0.0, seed=0, max_seq_len=128,
                           packing=True, batch_size=32, accumulation_steps=2, num_workers=0)
    shapes, used, n_batches = set(), [], 0
    for rank in range(2):
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        data = prepare_data(lambda _: _Lengths(lengths), args, info, pad_id=0, segments=True)
        for epoch in range(2):
            for _, micro_batches, _ in data.steps(epoch, 0, 2):
                for b in micro_batches:
                    cu = b["cu_seqlens"]
                    shapes.add(tuple(cu.shape))
                    starts = [int(s) for s in cu_seqlens_of(b["position_ids"])[:-1]]
                    assert sorted(set(cu.tolist()) - {b["input_ids"].numel()}) == starts
                    assert cu.dtype == torch.int32 and cu[-1] == b["input_ids"].numel()
                    used += [len(starts)] if epoch == 0 else []
                    n_batches += 1
    assert len(shapes) == 1 and n_batches > 40
    (shape,) = shapes
    slots, rows = shape[0] - 1, b["input_ids"].shape[0]
    fullest_row = max(len(row) for row in data.train.rows)
    assert max(used) <= slots < rows * (fullest_row + 1) and slots % SEGMENT_MULTIPLE == 0
    assert slots <= max(used) * 5 // 4 + 2 * SEGMENT_MULTIPLE  # a quarter to spare for later epochs, no more
    plain = prepare_data(lambda _: _Lengths(lengths), args, CPU, pad_id=0)
    assert "cu_seqlens" not in next(iter(plain.steps(0, 0, 1)))[1][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_varlen_packed_steps_follow_eager_dense_mask_on_cuda():
    """The trainer's default packed path on a GPU (each layer compiled, CUDA graphs, Flash attention's varlen
    kernel over cu_seqlens, bf16 autocast) trains the LoRA of the eager dense-mask path over 4 steps of 2
    micro-batches, within bf16's rounding (losses; see test_flex_packed_steps_follow_eager_dense_mask)."""
    from trainer.compiling import compile_decoder, pick_packed_attention
    from trainer.distributed import FlatGradients
    from trainer.engine import make_optimizer, train_step

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))

    def run(fast: bool) -> list[float]:
        model = tiny_model().cuda()
        if fast:
            torch._dynamo.reset()
            assert pick_packed_attention(model, "auto", True, True, info.device, per_layer=True) == "varlen"
            compile_decoder(model, cuda_graphs=True, per_layer=True)
        params = lora_parameters(model)
        flat_grads = FlatGradients(params) if fast else None  # as train_lora.py: AdamW over one flat tensor
        optimizer = make_optimizer(params, lr=1e-2, weight_decay=0.0, flat_grads=flat_grads)
        losses = []
        for step in range(4):
            micro_batches = []
            for i in range(2):
                b = packed_batch(seed=10 * step + i)
                if fast:
                    b["cu_seqlens"] = cu_seqlens_of(b["position_ids"], slots=12)
                micro_batches.append({k: v.cuda() for k, v in b.items()})
            n_supervised = sum(b["sup_targets"].numel() for b in micro_batches)
            loss, _ = train_step(SupervisedLoss(model), micro_batches, n_supervised, info, optimizer, None, params,
                                 lr=1e-2, grad_clip=1.0, amp_dtype=torch.bfloat16,
                                 flat_grads=flat_grads)
            losses.append(loss.item())
        return losses

    assert run(True) == pytest.approx(run(False), rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_segments_repeat_kv_heads_and_give_eager_outputs_and_gradients():
    """Compiled, attend_segments repeats the shared kv heads before the varlen kernel (so that Inductor sums
    their gradients); eager, the kernel reads them as they are. Outputs and q/k/v gradients must agree, bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(40, heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for heads in (8, 2, 2))
    segments = PackedSegments(torch.tensor([0, 7, 20, 20, 40], dtype=torch.int32, device="cuda"), 20)
    g = torch.randn(40, 8, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for run in (attend_segments, torch.compile(attend_segments, fullgraph=True)):
        out = run(q, k, v, segments)
        grads = torch.autograd.grad(out, (q, k, v), g)
        results.append((out, *grads))
    for eager, compiled in zip(*results, strict=True):
        assert (compiled.float() - eager.float()).abs().max() <= 2e-2 * eager.float().abs().max()
