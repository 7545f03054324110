"""Plots for the end-to-end reports (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["layer_sparsity_bars", "attention_map", "niah_heatmap", "save_panels", "report_dir"]


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'sparseattn[viz]'") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def layer_sparsity_bars(layers: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Bar per layer: sparsity actually used (sparse layers), hatched for dense / model-window layers."""
    plt = _plt()
    idx = sorted(layers, key=int)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(idx) + 2), 3.2))
    colors = {"sparse": "tab:blue", "dense": "tab:gray", "model_window": "tab:orange"}
    for i in idx:
        r = layers[i]
        sp = r.get("sparsity")
        ax.bar(int(i), sp if sp is not None else 0.0, color=colors.get(r["mode"], "tab:gray"),
               hatch=None if r["mode"] == "sparse" else "//", edgecolor="black", linewidth=0.3)
    ax.set_xlabel("layer")
    ax.set_ylabel("block sparsity (1 - density)")
    ax.set_ylim(0, 1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, label=m) for m, c in colors.items()
               if any(layers[i]["mode"] == m for i in idx)]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(title or "per-layer sparsity", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def attention_map(am: Mapping[str, Any], path: str | Path) -> Path:
    """Dense block attention mass (log scale) next to the mass the selected blocks keep."""
    import torch

    plt = _plt()
    mass = am["mass"].float()
    sel = am.get("selected")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    logm = torch.log10(mass.clamp(min=1e-8))
    logm = torch.where(mass > 0, logm, torch.full_like(logm, float("nan")))  # blocks outside the causal region
    im = axes[0].imshow(logm.numpy(), cmap="viridis", vmin=-8, vmax=0, interpolation="nearest")
    axes[0].set_title(f"dense: log10 block mass, layer {am['layer']} head {am['head']}", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    if sel is not None:
        kept = torch.where(sel[: mass.shape[0], : mass.shape[1]] > 0, logm, torch.full_like(logm, float("nan")))
        im2 = axes[1].imshow(kept.numpy(), cmap="viridis", vmin=-8, vmax=0, interpolation="nearest")
        rec = am.get("mass_recall")
        axes[1].set_title(f"sparse: selected blocks ({am['block']}x{am['block']}), mass kept "
                          + (f"{rec:.1%}" if rec is not None else "-"), fontsize=9)
        fig.colorbar(im2, ax=axes[1], fraction=0.046)
    else:
        axes[1].set_title(f"layer mode: {am.get('mode')} (no layout)", fontsize=9)
    for a in axes:
        a.set_xlabel("key block")
        a.set_ylabel("query block")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def niah_heatmap(grid: Mapping[str, Sequence[Sequence[float]]], lengths: Sequence[int], depths: Sequence[float],
                 path: str | Path, *, title: str = "") -> Path:
    """One accuracy heatmap (depth × length) per configuration (e.g. ``{"dense": ..., "sparse": ...}``)."""
    plt = _plt()
    import numpy as np

    names = list(grid)
    fig, axes = plt.subplots(1, len(names), figsize=(1.5 + (1.6 + 1.1 * len(lengths)) * len(names), 1.8 + 0.45 * len(depths)),
                             squeeze=False)
    for col, (ax, name) in enumerate(zip(axes[0], names)):
        data = np.array(grid[name], dtype=float)  # [depth, length]
        im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if col == 0:
            ax.set_ylabel("needle depth")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{name}: mean {np.nanmean(data):.0%}", fontsize=9)
    return save_panels(plt, fig, im, axes, path, title, 1.04)


def save_panels(plt: Any, fig: Any, im: Any, axes: Any, path: str | Path, title: str, title_y: float) -> Path:
    """Finish a row of heatmap panels (NIAH, RULER): one colour bar, the title at ``title_y``, saved and closed."""
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    if title:
        fig.suptitle(title, fontsize=10, y=title_y)
    p = Path(path)
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return p


def report_dir(func: str, out_dir: str | Path, plots: bool, heatmap: Callable[[Path], Path]) -> tuple[Path, dict[str, Path]]:
    """A report's folder (created) and its first path: ``{"heatmap": heatmap(folder)}`` with ``plots``, or ``{}``
    and a ``RuntimeWarning`` ``"<func>: heatmap skipped (...)"`` when matplotlib is missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots:
        try:
            paths["heatmap"] = heatmap(out)
        except ImportError as exc:
            import warnings

            warnings.warn(f"{func}: heatmap skipped ({exc})", RuntimeWarning, stacklevel=3)
    return out, paths
