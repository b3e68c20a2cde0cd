"""Learning-rate schedule: a pure function of the optimizer step (nothing to checkpoint)."""

import math


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """LR for 0-based optimizer `step`: linear warmup to `peak_lr`, then cosine down to peak_lr / 10.

    Warmup step s uses peak * (s + 1) / (warmup + 1), so the first step already moves (nanoGPT's
    choice); the cosine starts at peak on step `warmup_steps` and reaches MiniMind's floor, peak / 10,
    on the last step `total_steps - 1`.
    """
    floor = peak_lr / 10
    if step < warmup_steps:
        return peak_lr * (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_note(warmup_steps: int, total_steps: int) -> str | None:
    """A start-up note when the warmup does not end before the run does (the peak is never reached)."""
    if warmup_steps < total_steps:
        return None
    return (f"note: --warmup_iters {warmup_steps} is not shorter than the run's {total_steps} steps: the learning rate "
            f"only climbs, to {(total_steps) / (warmup_steps + 1):.0%} of --learning_rate at the last step")
