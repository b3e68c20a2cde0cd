"""Plot what a LoRA learned (size and rank of each ΔW = scale·B·A) and the loss curves of training runs.

    # where did the update go? a layers × modules heatmap of ‖ΔW‖_F plus the singular-value spectra
    # (after `python trainer/train_lora.py`, which writes out/lora_identity_256.pth and the PEFT dir beside it)
    python scripts/visualize_lora.py --lora_path out/lora_identity_256.pth --out_dir out/plots
    python scripts/visualize_lora.py --lora_path out/lora_identity_256 --out_dir out/plots   # PEFT dir

    # loss curves of one or more runs on one plot (a run's .pth or PEFT dir, or a save_dir of runs), e.g. after
    # `python trainer/train_lora.py --lora_rank 8 --lora_name lora_r8` and the same with 16 / lora_r16
    python scripts/visualize_lora.py --runs out/lora_r8_256.pth out/lora_r16_256.pth --out_dir out/plots
    python scripts/visualize_lora.py --runs out/ --out_dir out/plots

Writes `<name>_delta_norms.png`, `<name>_singular_values.png` and `loss_curves.png` into --out_dir.
"""

from trainer.frozen_imports import frozen_imports

# The garbage collector never scans what these imports build: 1-2 s less start-up.
with frozen_imports():
    import argparse
    import json
    import re
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on servers and in CI
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from model.atomic import make_output_folder
    from model.errors import UserError, exit_on_user_error
    from model.model_lora import LoRAError, read_lora, read_lora_plan
    from trainer.args import default_save_dir
    from trainer.checkpoint import load_resume



# ----------------------------------------------------------------------------- ΔW statistics


def delta_singular_values(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of ΔW = scale·B·A (descending), from r×r factors instead of the [out, in] matrix."""
    # B = Q_b R_b and Aᵀ = Q_a R_a with orthonormal Q's, so ΔW = Q_b (scale R_b R_aᵀ) Q_aᵀ has the
    # singular values of the small r×r core: cheap even for 4096-wide layers. float64 for accuracy.
    _, r_b = torch.linalg.qr(B.double())
    _, r_a = torch.linalg.qr(A.double().T)
    return torch.linalg.svdvals(scale * r_b @ r_a.T)


def split_name(name: str) -> tuple[int | None, str]:
    """'model.layers.3.self_attn.q_proj' → (3, 'self_attn.q_proj'); modules outside layers → (None, name)."""
    m = re.search(r"layers\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def delta_table(
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> dict[str, dict[int, torch.Tensor]]:
    """{module kind: {layer: singular values of its ΔW}} for every module inside a decoder layer."""
    table: dict[str, dict[int, torch.Tensor]] = {}
    for name, (A, B, scale) in lora.items():
        layer, kind = split_name(name)
        if layer is not None:
            table.setdefault(kind, {})[layer] = delta_singular_values(A, B, scale)
    if not table:
        raise LoRAError("the LoRA has no module inside a decoder layer (model.layers.N.*) to plot")
    return table


# ----------------------------------------------------------------------------- plots


def plot_delta_norms(table: dict[str, dict[int, torch.Tensor]], out_png: Path, title: str) -> None:
    """Heatmap of ‖ΔW‖_F (= sqrt(Σ σ²)) with layers as rows and module kinds as columns."""
    kinds = list(table)  # model order (q, k, v, o, gate, up, down), as the file lists them
    n_layers = 1 + max(max(per_layer) for per_layer in table.values())
    grid = np.full((n_layers, len(kinds)), np.nan)  # NaN (blank) where a layer has no LoRA on that module
    for j, kind in enumerate(kinds):
        for layer, s in table[kind].items():
            grid[layer, j] = s.pow(2).sum().sqrt().item()
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 3, 0.35 * n_layers + 2.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right")
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"LoRA update size ‖ΔW‖_F = ‖scale·B·A‖_F\n{title}")
    fig.colorbar(im, ax=ax, label="Frobenius norm")
    if grid.size <= 160:  # small enough to print the numbers in the cells
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                bright = im.norm(v) > 0.6  # viridis turns yellow: dark text there
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
    _save(fig, out_png)


def plot_singular_values(
    table: dict[str, dict[int, torch.Tensor]], out_png: Path, title: str, top: int
) -> None:
    """One panel per module kind: the top singular values of ΔW, one line per layer (colour = depth)."""
    kinds = list(table)  # model order (q, k, v, o, gate, up, down), as the file lists them
    cols = min(3, len(kinds))
    rows = (len(kinds) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    n_layers = 1 + max(max(per_layer) for per_layer in table.values())
    cmap = plt.get_cmap("plasma")
    norm = matplotlib.colors.Normalize(0, max(1, n_layers - 1))
    for ax, kind in zip(axes.flat, kinds):
        for layer, s in sorted(table[kind].items()):
            s = s[:top].numpy()
            ax.plot(range(1, len(s) + 1), s, marker="o", ms=3, color=cmap(norm(layer)))
        values = torch.cat([s[:top] for s in table[kind].values()])
        # A log axis shows the decay of the spectrum when it spans decades; it cannot show zeros.
        if values.min() > 0 and values.max() / values.min() > 50:
            ax.set_yscale("log")
        ax.set_title(kind)
        ax.set_xlabel("singular value index")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("σ")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.suptitle(f"Top {top} singular values of ΔW per module\n{title}")
    fig.tight_layout()
    bar = fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=axes,
        label="layer (line colour)",
        shrink=min(1.0, 0.9 / rows + 0.3),
    )
    bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
    bar.update_ticks()
    _save(fig, out_png)


def _save(fig: plt.Figure, out_png: Path) -> None:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_lora(lora_path: str | Path, out_dir: str | Path, top: int = 8) -> list[Path]:
    """Write the ‖ΔW‖ heatmap and the singular-value panels for one LoRA; return the PNG paths."""
    lora_path, out_dir = Path(lora_path), Path(out_dir)
    table = delta_table(read_lora(lora_path))
    name = lora_path.stem if lora_path.suffix == ".pth" else lora_path.name
    # DoRA also rescales each output row of W + ΔW by a learned magnitude, which needs the base to draw
    title = lora_path.name + (" (ΔW = s·B·A only: DoRA's magnitude not drawn)" if read_lora_plan(lora_path)[2] else "")
    norms_png, sv_png = out_dir / f"{name}_delta_norms.png", out_dir / f"{name}_singular_values.png"
    plot_delta_norms(table, norms_png, title)
    plot_singular_values(table, sv_png, title, top)
    return [norms_png, sv_png]


# ----------------------------------------------------------------------------- loss curves


def run_stems(path: str | Path) -> list[Path]:
    """The run stems (`{save_dir}/{lora_name}_{hidden}{_moe}`) a --runs entry names.

    Any file of a run (.pth, .json, _resume.pth, _loss.png), its PEFT adapter directory (the stem
    itself), or a save_dir holding one or more runs.
    """
    path = Path(path)
    if path.is_dir() and not (path / "adapter_config.json").is_file():
        stems = sorted(p.with_name(p.name[: -len("_resume.pth")]) for p in path.glob("*_resume.pth"))
        if not stems:
            raise UserError(f"{path}: no training run in it (no *_resume.pth written by the trainer)")
        return stems
    for suffix in ("_resume.pth", "_loss.png", ".pth", ".json"):
        if path.name.endswith(suffix):
            return [path.with_name(path.name[: -len(suffix)])]
    return [path]


def read_history(stem: Path) -> tuple[str, dict]:
    """A run's label and loss history {"train": [(step, loss)], "val": [(step, loss)]}."""
    config_path = stem.with_name(stem.name + ".json")
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (ValueError, OSError) as err:  # a damaged or unreadable run config
        raise UserError(f"{config_path}: cannot be read as the run's JSON config ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: holds a JSON {type(config).__name__}, not the run's config")
    history = config.get("history")
    if history is None:
        # The trainer keeps the history in its resume file, written with every checkpoint.
        resume = load_resume(stem.with_name(stem.name + "_resume.pth"))
        if resume is None:
            raise UserError(
                f"{stem}: found no loss history ({stem.name}_resume.pth or a 'history' in "
                f"{stem.name}.json, both written by trainer/train_lora.py)"
            )
        history = resume["state"]["history"]
    flags = config.get("args", {})
    # The legend tells runs apart by what is usually varied between them.
    details = [
        f"{short}={flags[flag]:g}"
        for short, flag in (("r", "lora_rank"), ("lr", "learning_rate"))
        if isinstance(flags.get(flag), (int, float))
    ]
    label = f"{stem.name} ({', '.join(details)})" if details else stem.name
    return label, {"train": list(history.get("train", [])), "val": list(history.get("val", []))}


def read_runs(stems: list[Path]) -> list[tuple[str, dict]]:
    """read_history of each run, a label that two runs share prefixed with each one's folder (the same --lora_name
    and flags in two save dirs)."""
    runs = [read_history(stem) for stem in stems]
    labels = [label for label, _ in runs]
    return [(f"{stem.parent.name}/{label}" if labels.count(label) > 1 else label, history)
            for stem, (label, history) in zip(stems, runs)]


def plot_loss_curves(runs: list[tuple[str, dict]], out_png: Path, smooth: float = 0.6) -> None:
    """Train loss (raw, faint, and an EMA, solid) and validation loss (markers) of every run on one plot."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = plt.get_cmap("tab10")
    for i, (label, history) in enumerate(runs):
        color = colors(i % 10)
        if history["train"]:
            steps, losses = map(np.array, zip(*history["train"]))
            ema, value = np.empty_like(losses), losses[0]
            for j, x in enumerate(losses):  # an exponential moving average shows the trend through the noise
                value = smooth * value + (1 - smooth) * x
                ema[j] = value
            ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema, color=color, linewidth=1.8, label=f"{label} train")
        if history["val"]:
            steps, losses = zip(*history["val"])
            ax.plot(steps, losses, "o--", color=color, markersize=4, label=f"{label} val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.set_title(f"Loss curves (train: EMA {smooth:.2f} over the faint raw values; val: markers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The plotting flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--lora_path",
        nargs="*",
        default=[],
        help="LoRA(s) to plot: a MiniMind .pth LoRA file or a PEFT adapter directory",
    )
    p.add_argument(
        "--runs",
        nargs="*",
        default=[],
        help="training runs whose loss curves go on one plot: a run's .pth/.json/_resume.pth, its "
        "PEFT directory, or a save_dir (every run in it)",
    )
    p.add_argument(
        "--top", type=int, default=8, help="how many singular values per module to plot (default 8)"
    )
    p.add_argument(
        "--smooth",
        type=float,
        default=0.6,
        help="EMA factor for the train curves in [0, 1); 0 = raw values only (default 0.6)",
    )
    p.add_argument(
        "--out_dir",
        default=str(default_save_dir() / "plots"),
        help="folder for the PNGs (created if missing; default: plots/ in $MINILORA_OUT_DIR or <repo>/out)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse flags and write the requested plots."""
    p = build_parser()
    args = p.parse_args(argv)
    if not args.lora_path and not args.runs:
        p.error("nothing to plot: give --lora_path and/or --runs")
    if args.top < 1:
        p.error(f"--top must be at least 1 (got {args.top})")
    if not 0 <= args.smooth < 1:
        p.error(f"--smooth must be in [0, 1), got {args.smooth}")
    exit_on_user_error(lambda: plot(args))


def plot(args: argparse.Namespace) -> None:
    """Write the PNGs the flags ask for, printing each path."""
    make_output_folder(args.out_dir, f"--out_dir {args.out_dir}")
    for path in args.lora_path:
        for png in plot_lora(path, args.out_dir, args.top):
            print(f"wrote {png}")
    if args.runs:
        runs = read_runs([stem for path in args.runs for stem in run_stems(path)])
        png = Path(args.out_dir) / "loss_curves.png"
        plot_loss_curves(runs, png, args.smooth)
        print(f"wrote {png} ({len(runs)} run{'s' if len(runs) > 1 else ''})")


if __name__ == "__main__":
    main()
