"""Plot what a LoRA learned (size and rank of each ΔW = scale·B·A) and the loss curves of training runs.

    # where did the update go? a layers × modules heatmap of ‖ΔW‖_F plus the singular-value spectra
    python scripts/visualize_lora.py --lora_path out/lora_identity_768.pth --out_dir out/plots
    python scripts/visualize_lora.py --lora_path out/lora_identity_768 --out_dir out/plots   # PEFT dir

    # loss curves of one or more runs on one plot (each run: its save_dir, or the metrics file itself)
    python scripts/visualize_lora.py --runs out/run_r8 out/run_r16 --out_dir out/plots

Writes `<name>_delta_norms.png`, `<name>_singular_values.png` and `loss_curves.png` into --out_dir.
"""

import argparse
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.errors import UserError  # noqa: E402
from model.model_lora import LoRAError, _read_minimind, _read_peft, lora_scale  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- ΔW statistics


def read_lora(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Read a MiniMind `.pth` LoRA file or a PEFT adapter dir into {module: (A, B, scale)}."""
    path = Path(path)
    if not path.exists():
        raise LoRAError(f"{path}: no such LoRA file or adapter directory")
    adapters, use_rslora, _ = _read_minimind(path) if path.suffix == ".pth" else _read_peft(path)
    return {n: (a.A, a.B, lora_scale(a.A.shape[0], a.alpha, use_rslora)) for n, a in adapters.items()}


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
    kinds = sorted(table)
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
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="w")
    _save(fig, out_png)


def plot_singular_values(
    table: dict[str, dict[int, torch.Tensor]], out_png: Path, title: str, top: int
) -> None:
    """One panel per module kind: the top singular values of ΔW, one line per layer (colour = depth)."""
    kinds = sorted(table)
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
        ax.set_ylabel("σ")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.suptitle(f"Top {top} singular values of ΔW per module\n{title}")
    fig.tight_layout()
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer (line colour)")
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
    norms_png, sv_png = out_dir / f"{name}_delta_norms.png", out_dir / f"{name}_singular_values.png"
    plot_delta_norms(table, norms_png, lora_path.name)
    plot_singular_values(table, sv_png, lora_path.name, top)
    return [norms_png, sv_png]


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """Parse flags and write the requested plots."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--lora_path",
        nargs="*",
        default=[],
        help="LoRA(s) to plot: a MiniMind .pth LoRA file or a PEFT adapter directory",
    )
    p.add_argument("--top", type=int, default=8, help="how many singular values per module to plot")
    p.add_argument(
        "--out_dir",
        default=str(REPO_ROOT / "out" / "plots"),
        help="folder for the PNGs (created if missing; default <repo>/out/plots)",
    )
    args = p.parse_args(argv)
    if not args.lora_path:
        p.error("nothing to plot: give --lora_path")
    try:
        for path in args.lora_path:
            for png in plot_lora(path, args.out_dir, args.top):
                print(f"wrote {png}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
