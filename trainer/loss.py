"""Next-token loss computed only where labels are supervised, so prompt tokens never get vocabulary logits."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


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


class SupervisedLoss(nn.Module):
    """Wraps a causal LM: forward returns (sum of token CE at supervised positions, MoE aux loss).

    It is a module (not a function) so that DDP wraps it: DDP must see the forward that builds the
    graph. The sum is divided by the step's global token count by the caller.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        vocab = model.lm_head.weight.shape[0]
        # ~128M logits (512 MB in fp32) per chunk: big enough to be fast, small enough for 150k vocabularies.
        self.chunk_tokens = chunk_tokens or max(256, (1 << 27) // vocab)

    def forward(
        self,
        input_ids: torch.Tensor,
        sup_index: torch.Tensor,
        sup_targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CE over the supervised positions, aux loss or 0)."""
        out = self.model.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        lm_head = self.model.lm_head
        n = sup_index.numel()
        if n <= self.chunk_tokens:
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
