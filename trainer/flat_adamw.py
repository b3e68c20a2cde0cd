"""AdamW over trainable tensors held in one flat buffer: one tensor to update instead of hundreds.

torch's AdamW walks its parameter list in Python at every step: at the Qwen3-0.6B shape, 392 LoRA tensors
take about 2 ms of host time, which the GPU spends idle once it has caught up with the host (docs/PERF.md).
AdamW is elementwise, so one step over a flat tensor that holds every parameter is the same update as the
step over the parameters one by one, up to the last bit: a fused kernel may round the elements at a
tensor's end differently (a CPU runs them outside its vector loop), and joining the tensors moves those
ends. The parameters stay what they were (same names, shapes and Parameter objects, now views of the flat
tensor), and `state_dict` is laid out per parameter exactly as AdamW's over them: resume files are the
same with and without it.
"""

import torch
from torch import nn


def flatten_parameters(params: list[nn.Parameter], grads: torch.Tensor) -> nn.Parameter:
    """One flat Parameter holding `params` in order (each becomes a view of it) with `grads` as its gradient:
    `grads` must hold their gradients in the same order (trainer.distributed.FlatGradients.buffer)."""
    if grads.numel() != sum(p.numel() for p in params):
        raise ValueError("the gradient buffer and the parameters differ in size")
    flat = torch.empty_like(grads)
    offset = 0
    for p in params:
        piece = flat[offset:offset + p.numel()]
        piece.copy_(p.detach().reshape(-1))
        p.data = piece.view_as(p)
        offset += p.numel()
    flat = nn.Parameter(flat)
    flat.grad = grads
    return flat


class FlatAdamW(torch.optim.AdamW):
    """AdamW over `flat` (flatten_parameters' result for `params`), saved and loaded per parameter of `params`."""

    def __init__(self, params: list[nn.Parameter], flat: nn.Parameter, **kwargs: object) -> None:
        super().__init__([flat], **kwargs)
        self.sizes = [p.numel() for p in params]
        self.shapes = [p.shape for p in params]

    def state_dict(self) -> dict:
        """AdamW's state_dict as if it held `params`: one entry per parameter, each a view of the flat state."""
        packed = super().state_dict()
        total = sum(self.sizes)
        flat_state = packed["state"].get(0)
        per_param = {}
        if flat_state is not None:
            pieces = {k: v.split(self.sizes) for k, v in flat_state.items() if torch.is_tensor(v) and v.numel() == total}
            # Each parameter gets its own `step` tensor: AdamW increments each one in place.
            per_param = {i: {k: pieces[k][i].view(shape) if k in pieces else _own(v) for k, v in flat_state.items()}
                         for i, shape in enumerate(self.shapes)}
        group = {**packed["param_groups"][0], "params": list(range(len(self.sizes)))}
        return {"state": per_param, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a per-parameter state_dict (this class's, or AdamW's over the same parameters)."""
        groups = state_dict["param_groups"]
        ids = [i for group in groups for i in group["params"]]
        if len(groups) != 1 or len(ids) != len(self.sizes):
            raise ValueError(f"the loaded state has {len(ids)} parameters in {len(groups)} group(s); this optimizer "
                             f"has {len(self.sizes)} in 1")
        state = state_dict["state"]
        flat_state = {}
        if state:
            if any(i not in state for i in ids):
                raise ValueError("the loaded state lacks some parameters' moments")
            entries = [state[i] for i in ids]
            for key, value in entries[0].items():
                sized = torch.is_tensor(value) and value.numel() == self.sizes[0] and value.dim() > 0
                flat_state[key] = torch.cat([e[key].reshape(-1) for e in entries]) if sized else value
        super().load_state_dict({"state": {0: flat_state} if flat_state else {},
                                 "param_groups": [{**groups[0], "params": [0]}]})


def _own(value: object) -> object:
    """A copy of a tensor (any other value as it is)."""
    return value.clone() if torch.is_tensor(value) else value
