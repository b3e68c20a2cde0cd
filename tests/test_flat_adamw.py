"""AdamW over one flat tensor (trainer/flat_adamw.py) against torch's AdamW over the parameters themselves:
the same updates, the same state_dict layout, and resume files of either one load into the other.

"The same" is up to the last bit: on a CPU the fused kernel runs most elements vectorized and a tensor's
last few in a scalar loop, which may round differently, and where a tensor ends moves when they are joined.
Two runs with the same layout (an interrupted run and its resumed continuation) agree bit for bit."""

import pytest
import torch
from torch import nn

from trainer.distributed import FlatGradients
from trainer.engine import make_optimizer

SHAPES = [(4, 8), (8,), (3, 4), (1,), (16, 2)]


def params_and_grads(seed: int = 0, steps: int = 5) -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    return params, grads


def per_parameter(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], torch.optim.Optimizer, None]:
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    return copies, make_optimizer(copies, lr=1e-2, weight_decay=0.1), None


def flat(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], torch.optim.Optimizer, FlatGradients]:
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    flat_grads = FlatGradients(copies)
    return copies, make_optimizer(copies, lr=1e-2, weight_decay=0.1, flat_grads=flat_grads), flat_grads


def step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, flat_grads: FlatGradients | None,
         grads: list[torch.Tensor], skip: bool = False) -> None:
    """One update with `grads`, set the way train_step leaves them (flat: written into the buffer's views)."""
    for p, g in zip(params, grads, strict=True):
        if flat_grads is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
    optimizer.found_inf = torch.tensor(float(skip))  # as train_step: a bad step is skipped on the device
    optimizer.step()
    del optimizer.found_inf


def assert_same(x: torch.Tensor, y: torch.Tensor, exact: bool = False) -> None:
    assert x.shape == y.shape
    if exact:
        assert torch.equal(x, y)
    else:
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-12)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key in a["state"][i]:
            assert_same(a["state"][i][key], b["state"][i][key])


def test_flat_adamw_updates_and_saves_like_adamw():
    params, grads = params_and_grads()
    runs = [per_parameter(params), flat(params)]
    for n, step_grads in enumerate(grads):
        for run in runs:
            step(*run, step_grads, skip=n == 2)
    (plain, plain_opt, _), (flat_params, flat_opt, _) = runs
    for p, q in zip(plain, flat_params, strict=True):
        assert_same(q, p)
    assert not torch.equal(plain[0], params[0])  # the steps did move the weights
    assert_same_state(flat_opt.state_dict(), plain_opt.state_dict())


@pytest.mark.parametrize("writer,reader", [(per_parameter, flat), (flat, per_parameter), (flat, flat)])
def test_a_saved_state_continues_the_same_in_either_optimizer(tmp_path, writer, reader):
    """A resume file written by one layout and read by the other (an older run's file, or a MoE run's)
    continues exactly like the uninterrupted run."""
    params, grads = params_and_grads(steps=4)
    reference = per_parameter(params)
    for g in grads:
        step(*reference, g)
    first = writer(params)
    for g in grads[:2]:
        step(*first, g)
    torch.save({"weights": [p.detach() for p in first[0]], "optimizer": first[1].state_dict()}, tmp_path / "r.pth")
    saved = torch.load(tmp_path / "r.pth", weights_only=True)
    second = reader([nn.Parameter(w) for w in saved["weights"]])
    second[1].load_state_dict(saved["optimizer"])
    for g in grads[2:]:
        step(*second, g)
    exact = writer is reader  # a run resumed in its own layout continues bit for bit
    uninterrupted = reference if writer is per_parameter else writer(params)
    if uninterrupted is not reference:
        for g in grads:
            step(*uninterrupted, g)
    for p, q in zip(second[0], uninterrupted[0], strict=True):
        assert_same(p, q, exact)


def test_a_state_of_other_parameters_is_refused():
    params, grads = params_and_grads(steps=1)
    plain = per_parameter(params[:3])
    step(*plain, grads[0][:3])
    _, optimizer, _ = flat(params)
    with pytest.raises(ValueError, match="3 parameters"):
        optimizer.load_state_dict(plain[1].state_dict())


def test_parameters_become_views_of_one_tensor():
    params, _ = params_and_grads()
    before = [p.detach().clone() for p in params]
    flat_grads = FlatGradients(params)
    optimizer = make_optimizer(params, lr=1e-2, weight_decay=0.0, flat_grads=flat_grads)
    (flat_param,) = optimizer.param_groups[0]["params"]
    assert flat_param.grad is flat_grads.buffer and flat_param.numel() == sum(p.numel() for p in params)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b) and p.untyped_storage().data_ptr() == flat_param.untyped_storage().data_ptr()
