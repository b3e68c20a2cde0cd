"""Divergence: notice a run that has blown up, and never let it save over the last good checkpoint.

A diverging run is not always nan. It can collapse with a finite loss: weights so large that every logit
saturates, the output uniform (loss exactly ln(vocab)) and the gradient 0, so nothing pulls it back. The
guard watches the logged (loss, grad_norm) rows and, before each save, the trainable weights themselves.
"""

import math
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from model.errors import UserError

FP16_MAX = 65504.0  # MiniMind-layout LoRA files are float16: a larger weight is saved as inf
BLOWUP = 100.0  # weights whose norm grew this many times since the last good save have blown up
WINDOW = 20  # logged steps that make "the recent loss"


class TrainingDiverged(UserError):
    """The run diverged (nan/inf loss, or a collapse); its message says where the last good weights are."""


class DivergenceGuard:
    """Reports nan/inf steps (already skipped on the device), spots a collapse, and vets every save.

    `good` is where the last good weights are: (step, file), from the resume file a run continued from,
    then from each save this guard let through (train_lora.py's save: `allow_save`, then write).
    """

    def __init__(self, vocab_size: int, params: list[torch.Tensor], history: list[tuple[int, float]],
                 checkpoint: Path | None, step: int = 0, limit: int = 5) -> None:
        """`checkpoint`: the file that holds the weights of each save; `step`: the step a resumed run
        continues from (its checkpoint is good), 0 for a fresh run."""
        self.ln_vocab = math.log(max(vocab_size, 2))
        self.limit, self.in_a_row = limit, 0
        self.checkpoint = checkpoint
        self.good = (step, checkpoint) if step else None
        # The loss over the last WINDOW logged steps, and its mean at the last good save, or over the run's first
        # WINDOW steps: never one step's loss, which a batch the base already knows can put near 0.
        self.window: deque[float] = deque((loss for _, loss in history[-WINDOW:]), maxlen=WINDOW)
        self.reference: float | None = None
        self.reference_from = "the last good save"
        self._take_reference("the last good save")
        self.norm = weight_norm(params)

    def check(self, rows: Iterable[tuple[int, float, float]], write: Callable[[str], None],
              check_grads: bool) -> None:
        """rows: (step, loss, grad_norm) as read back by the logger; `check_grads`: without a GradScaler,
        a nan/inf gradient norm is a skipped step too (with one, the scaler skips those as routine)."""
        for step, loss, grad_norm in rows:
            if math.isfinite(loss):
                self.window.append(loss)
                if self.reference is None:  # a fresh run: the mean of its first WINDOW steps, once there are
                    self._take_reference(f"the run's first {WINDOW} logged steps")
            if grad_norm == 0.0 and abs(loss - self.ln_vocab) < 0.01 * self.ln_vocab:
                raise TrainingDiverged(f"step {step}: the model has collapsed: the loss is ln(vocab) = "
                                       f"{self.ln_vocab:.4f} (a uniform output) and the gradient is 0, so "
                                       f"nothing can bring it back; {self.advice()}")
            bad_grad = check_grads and not math.isfinite(grad_norm)
            if math.isfinite(loss) and not bad_grad:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            write(f"step {step}: {what}; skipped this step (no weight update)")
            if self.in_a_row >= self.limit:
                raise TrainingDiverged(
                    f"the loss was nan/inf for {self.in_a_row} optimizer steps in a row (last: step {step}); "
                    "stopping. Try a lower --learning_rate (or more --warmup_iters), check the data for "
                    f"broken samples, and use --dtype bfloat16 rather than float16. {self.advice()}")

    def vet_save(self, step: int, params: list[torch.Tensor]) -> str | None:
        """Before saving at `step`: raise TrainingDiverged if the weights are broken or blown up; return a
        reason to skip this save if the loss is far above the loss at the last good save; None if fine."""
        with torch.no_grad():
            finite = all(bool(torch.isfinite(p).all()) for p in params)
            peak = max((float(p.detach().abs().max()) for p in params if p.numel()), default=0.0)
        norm = weight_norm(params)
        if not finite:
            raise TrainingDiverged(f"step {step}: the trained weights hold nan/inf; not saving them. {self.advice()}")
        if peak > FP16_MAX or (self.norm > 0 and norm > BLOWUP * self.norm):
            since = "at the last good save" if self.good else "at the start"
            raise TrainingDiverged(f"step {step}: the trained weights have blown up (norm {norm:.3g}, was "
                                   f"{self.norm:.3g} {since}; largest {peak:.3g}); not saving them. {self.advice()}")
        recent = _mean(list(self.window))
        if recent is not None and self.reference is not None and recent > 2 * self.reference + 1.0:
            return (f"the mean loss of the last {WINDOW} logged steps, {recent:.4f}, is far above the "
                    f"{self.reference:.4f} of {self.reference_from} (more than twice it plus 1)")
        return None

    def allow_save(self, step: int, params: list[torch.Tensor], log: object, final: bool,
                   check_grads: bool) -> bool:
        """Whether to save at `step` (every rank gets the same answer: same weights, all-reduced losses).

        Reads back the steps `log` has not shown yet, vets the weights; a skipped save says so. A final save the
        loss test refuses raises TrainingDiverged when an earlier good checkpoint exists (it stays as it was);
        with none, the weights (finite, not blown up) are saved with a warning rather than lost.
        """
        self.check(log.flush(), log.write, check_grads)
        skip = self.vet_save(step, params)
        if skip and final and self.good is None:
            # Finite weights, no earlier checkpoint to keep: saving loses nothing, refusing loses the whole run
            log.write(f"step {step}: {skip}; saved all the same, as no earlier checkpoint of this run exists. "
                      "Check the loss curve before using it")
        elif skip and final:
            raise TrainingDiverged(f"step {step}: {skip}; not saving. {self.advice()}")
        elif skip:
            log.write(f"step {step}: not saving: {skip}. {self.advice()}")
            return False
        self.saved(step, params)
        return True

    def saved(self, step: int, params: list[torch.Tensor]) -> None:
        """Record a save that vet_save let through: the new last good checkpoint and reference."""
        self.good = (step, self.checkpoint)
        self.norm = weight_norm(params)
        self._take_reference("the last good save")

    def _take_reference(self, source: str) -> None:
        """The window's mean becomes the loss to compare with, once the window is full (a few steps are noise)."""
        if len(self.window) == WINDOW:
            self.reference, self.reference_from = _mean(list(self.window)), source

    def advice(self) -> str:
        """Where the last good weights are, and how to continue from them."""
        if self.good is None:
            return ("No checkpoint of this run was saved before this, so nothing is lost on disk; start again "
                    "with a lower --learning_rate (or more --warmup_iters).")
        step, path = self.good
        return (f"The last good checkpoint is {path} (step {step}), left as it was; continue from it with "
                "--from_resume 1 and a lower --learning_rate.")


def weight_norm(params: list[torch.Tensor]) -> float:
    """The L2 norm of all `params` together (nan/inf when any is)."""
    if not params:
        return 0.0
    with torch.no_grad():
        return float(torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in params])))


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None
