"""PNG figures for the reports (matplotlib, headless).

Inputs are plain dicts so the same figures serve `esft report` and the specialization study:
``token_scores``: task -> layer -> [E] token-selection shares (each layer sums to 1);
``selected``: task -> layer -> [expert ids].
"""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap(selected: dict[str, dict[int, list[int]]]) -> dict[str, dict[str, float]]:
    """Task x task Jaccard index of the selected experts, averaged over the layers."""
    names = list(selected)
    out = {}
    for a in names:
        layers = sorted(selected[a])
        out[a] = {b: sum(jaccard(set(selected[a][l]), set(selected[b].get(l, []))) for l in layers) / len(layers)
                  for b in names}
    return out


def overlap_matrix(selected: dict[str, dict[int, list[int]]], path: str | Path, title: str) -> dict:
    """Heatmap of :func:`overlap`; returns the matrix."""
    import numpy as np

    plt = _plt()
    mat_d = overlap(selected)
    names = list(selected)
    mat = np.array([[mat_d[a][b] for b in names] for a in names])
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1.0 + 0.6 * len(names)))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", color="w" if mat[i, j] < 0.6 else "k",
                    fontsize=7)
    fig.colorbar(im, ax=ax, label="Jaccard overlap of selected experts")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return mat_d


def routing_heatmaps(token_scores: dict[str, dict[int, list[float]]], path: str | Path) -> None:
    """One panel per MoE layer: rows = tasks, columns = experts, colour = token-selection share."""
    import numpy as np

    plt = _plt()
    names = list(token_scores)
    layers = sorted(next(iter(token_scores.values())))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 0.4 * len(names) + 1.6), squeeze=False)
    for ax, l in zip(axes[0], layers):
        m = np.array([token_scores[n][l] for n in names])
        im = ax.imshow(m, aspect="auto", cmap="magma")
        ax.set_title(f"layer {l}", fontsize=9)
        ax.set_yticks(range(len(names)), names if l == layers[0] else [""] * len(names), fontsize=8)
        ax.set_xlabel("routed expert")
    fig.colorbar(im, ax=list(axes[0]), label="share of the task's token selections", fraction=0.02)
    fig.suptitle("Task x expert routing (ESFT-Token scores)", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def concentration_curves(token_scores: dict[str, dict[int, list[float]]], path: str | Path) -> dict[str, list[float]]:
    """Share of routing mass carried by the k most used experts, k = 1..E, averaged over layers.

    Returns task -> [E] curve. A task whose curve rises steeply is handled by few experts,
    which is what makes training only those experts viable; uniform routing is the diagonal.
    """
    import numpy as np

    plt = _plt()
    curves = {}
    for name, per_layer in token_scores.items():
        rows = []
        for scores in per_layer.values():
            s = np.sort(np.asarray(scores, dtype=float))[::-1]
            rows.append(np.cumsum(s) / max(s.sum(), 1e-12))
        curves[name] = np.mean(rows, axis=0).tolist()
    E = len(next(iter(curves.values())))
    fig, ax = plt.subplots(figsize=(6, 4))
    k = np.arange(1, E + 1)
    for name, c in curves.items():
        ax.plot(k, c, marker=".", label=name)
    ax.plot(k, k / E, "k--", lw=1, label="uniform routing")
    ax.axhline(0.2, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("number of experts (most used first)")
    ax.set_ylabel("share of token selections (mean over layers)")
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7)
    ax.set_title("Routing concentration per task", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return curves


def tradeoff(points: dict[str, tuple[float, float]], base_general: float, path: str | Path) -> None:
    """Scatter of (mean task score, mean general ability) per method; up-right is better."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(base_general, color="grey", lw=0.8, ls="--", label="base model's general ability")
    ax.set_xlabel("task score (mean over tasks and seeds)")
    ax.set_ylabel("general ability after training")
    ax.legend(fontsize=7)
    ax.set_title("Task skill vs retained general ability", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontiers(panels: dict[str, dict], budgets: list[float], path: str | Path) -> None:
    """One panel per task: each method's Pareto-front height (task score) against the forgetting budget.

    ``panels``: task -> {"base": base task score, "methods": {method: {"budget": [b...],
    "mean": [...], "std": [...], "runs": [(forgetting, score, lr, seed), ...], "ls": line style (optional)}}}. The curve is the
    seeds' mean frontier value (band: ± std); the dots are the individual runs (hollow: seed 0 of
    the LR grid; filled: the other seeds at the frontier LRs).
    """
    import numpy as np

    plt = _plt()
    n = len(panels)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    colors = {}
    for ax, (task, panel) in zip(axes.flat, panels.items()):
        for method, m in panel["methods"].items():
            c = colors.setdefault(method, f"C{len(colors)}")
            b, mean, std = (np.asarray(m[k], dtype=float) for k in ("budget", "mean", "std"))
            ax.plot(b, mean, color=c, lw=1.8, ls=m.get("ls", "-"), label=method)
            ax.fill_between(b, mean - std, mean + std, color=c, alpha=0.15, lw=0)
            for f, s, _lr, seed in m["runs"]:
                ax.scatter([f], [s], s=18, edgecolors=c, facecolors="none" if seed == 0 else c, alpha=0.8, lw=0.8)
        for x in budgets:
            ax.axvline(x, color="grey", lw=0.6, ls=":")
        ax.axhline(panel["base"], color="k", lw=0.7, ls="--", label="base model")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("forgetting: general-ability points lost")
        ax.set_ylabel("task score (front height)")
        ax.set_xlim(left=min(-1.0, ax.get_xlim()[0]))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Task score at matched forgetting: Pareto front of each method's runs (curves: mean over seeds; "
                 "dots: runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
