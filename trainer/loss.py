"""Next-token loss computed only where labels are supervised, so prompt tokens never get vocabulary logits."""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.utils.checkpoint import checkpoint

from trainer.base_model import is_moe

IGNORE_INDEX = -100
ROW_MULTIPLE = 128  # supervised rows reach the LM head in multiples of this on a GPU (see pad_rows)


def supervision(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in [B*T] whose *next* token is supervised, and those next tokens.

    Runs on the CPU in the data pipeline: the number of positions is then known before the batch
    reaches the GPU, so selecting them there needs no host sync (boolean masking would).
    """
    following = labels[:, 1:]
    rows, cols = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, following[rows, cols]


def _chunk_ce(hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Summed cross-entropy of one chunk of supervised positions (logits in fp32 for a stable softmax)."""
    logits = lm_head(hidden.index_select(0, index)).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _ce_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of one chunk of logits and its gradient w.r.t. them (softmax − one-hot), in their dtype.
    Rows whose target is IGNORE_INDEX (padding, see pad_rows) add nothing and get a zero gradient."""
    logits32 = logits.float()  # fp32 for a stable softmax, as in _chunk_ce
    keep = (targets != IGNORE_INDEX)[:, None]
    picked_at = targets.clamp(min=0)[:, None]
    lse = torch.logsumexp(logits32, dim=-1, keepdim=True)
    picked = logits32.gather(1, picked_at)
    # The one-hot as a comparison, not a scatter into the softmax: compiled, the gradient is then one pass that
    # writes the logits' dtype, with no fp32 [rows, vocab] buffer in between (docs/PERF.md). In place, so that
    # eager (CPU) runs hold no more [rows, vocab] temporaries than the softmax itself.
    one_hot = torch.arange(logits.shape[1], device=logits.device) == picked_at
    grad = torch.exp(logits32 - lse).add_(one_hot, alpha=-1).masked_fill_(~keep, 0.0)
    return ((lse - picked) * keep).sum(), grad.to(logits.dtype)


def pad_rows(index: torch.Tensor, targets: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`index` and `targets` padded to a multiple of `multiple` rows (index 0, target IGNORE_INDEX).

    Why: the supervised-token count differs in every micro-batch, and so would the head GEMMs' shapes.
    cuBLAS chooses a kernel per new shape on the host: 0.3 ms for the logits GEMM and 3.6 ms for the
    gradient one at a 151,936-token vocabulary on an H200 host, 20 ms per micro-batch in all, which left
    the GPU waiting for its host (docs/PERF.md, "Host time: cuBLAS choosing kernels"). Padded, the shapes come from a small set that
    it has seen before.
    """
    return pad_rows_to(index, targets, index.numel() + -index.numel() % multiple)


def pad_rows_to(index: torch.Tensor, targets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`index` and `targets` padded to `rows` rows (index 0, target IGNORE_INDEX)."""
    n_pad = rows - index.numel()
    if n_pad == 0:
        return index, targets
    return F.pad(index, (0, n_pad)), F.pad(targets, (0, n_pad), value=IGNORE_INDEX)


@functools.cache
def _ce_and_grad_compiled() -> Callable:
    # One fused pass over each chunk's logits instead of ~6 eager ones; dynamic: chunk sizes vary.
    return torch.compile(_ce_and_grad, dynamic=True)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of `hidden @ weightᵀ (+ bias)` for a frozen head, with the hidden gradient made in forward.

    Each chunk's logits give their gradient right away (softmax − one-hot), which times the head weight
    is the chunk's share of d(hidden). So the head GEMM runs once (checkpointed chunks run it again in
    backward), no logits outlive their chunk, and backward is one scale.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        ce_and_grad = _ce_and_grad_compiled() if hidden.is_cuda else _ce_and_grad
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            ce, grad_logits = ce_and_grad(F.linear(hidden[sl], weight, bias), targets[sl])
            total += ce
            grad_hidden[sl] = grad_logits @ weight.to(grad_logits.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad_total: torch.Tensor) -> tuple:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


class SupervisedLoss(nn.Module):
    """Wraps a causal LM: forward returns (sum of token CE at supervised positions, MoE aux loss).

    It is a module (not a function) so that DDP wraps it: DDP must see the forward that builds the
    graph. The sum is divided by the step's global token count by the caller.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int | None = None, fused: bool = True,
                 row_multiple: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fused = fused  # _LinearCrossEntropy when the head is frozen (False: the checkpointed chunks)
        # The trainer's batches are right-padded, and under causal attention no real token can see a pad to
        # its right, so the padding mask changes nothing at supervised positions; dropping it lets attention
        # run the fast unmasked causal kernel. MoE keeps it: pads would otherwise join the routing statistics
        # of the aux loss.
        self.drop_padding_mask = not is_moe(model)
        vocab = model.lm_head.weight.shape[0]
        # ~128M logits (512 MB in fp32) per chunk: big enough to be fast, small enough for 150k vocabularies;
        # a multiple of ROW_MULTIPLE, so that the chunks of padded rows have shapes from a small set too.
        self.chunk_tokens = chunk_tokens or max(256, (1 << 27) // vocab // ROW_MULTIPLE * ROW_MULTIPLE)
        # The head sees its rows padded to a multiple of this (pad_rows). Default: ROW_MULTIPLE on a GPU,
        # where a new GEMM shape costs host time; none on a CPU, where the padding would only add work.
        self.row_multiple = row_multiple

    def forward(
        self,
        input_ids: torch.Tensor,
        sup_index: torch.Tensor,
        sup_targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CE over the supervised positions, aux loss or 0); `cu_seqlens`: packed rows' sample
        boundaries, for a decoder that attends through them (MiniMindModel)."""
        if self.drop_padding_mask:
            attention_mask = None
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        # use_cache=False: with a KV cache transformers models skip the check that keeps packed samples apart.
        out = self.model.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                               **packed)
        hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        lm_head = self.model.lm_head
        # Pad rows are ignored by both heads below (F.cross_entropy's ignore_index, _ce_and_grad's mask).
        sup_index, sup_targets = pad_rows(sup_index, sup_targets,
                                          self.row_multiple or (ROW_MULTIPLE if hidden.is_cuda else 1))
        n = sup_index.numel()
        frozen_head = type(lm_head) is nn.Linear and not any(p.requires_grad for p in lm_head.parameters())
        if self.fused and frozen_head and torch.is_grad_enabled() and hidden.requires_grad:
            ce_sum = _LinearCrossEntropy.apply(hidden.index_select(0, sup_index), lm_head.weight, lm_head.bias,
                                               sup_targets, self.chunk_tokens)
        elif n <= self.chunk_tokens:
            # An empty selection still returns a zero connected to the graph, so DDP's hooks fire.
            ce_sum = _chunk_ce(hidden, sup_index, sup_targets, lm_head)
        else:
            # Recompute each chunk's logits in backward: only one chunk of logits is ever alive.
            ce_sum = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, n, self.chunk_tokens):
                sl = slice(start, start + self.chunk_tokens)
                ce_sum = ce_sum + checkpoint(_chunk_ce, hidden, sup_index[sl], sup_targets[sl], lm_head,
                                             use_reentrant=False)
        aux = getattr(out, "aux_loss", None)
        if aux is None or not torch.is_tensor(aux):
            aux = hidden.new_zeros((), dtype=torch.float32)
        return ce_sum, aux.float()
