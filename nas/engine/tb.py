"""TensorBoard logging helpers (torch.utils.tensorboard) and α plots (matplotlib, Agg backend)."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are rendered to images, never shown
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nas.genotype import steps_for_edges  # noqa: E402


def edge_labels(steps: int) -> list:
    """Row labels of α for a DAG with ``steps`` intermediate nodes: ``"j->i"``, in α's row order."""
    return [f"{j}->{i}" for i in range(1, steps + 1) for j in range(i)]


def alpha_heatmap(alphas: torch.Tensor, ops: Sequence[str], title: str = ""):
    """A matplotlib Figure of softmax(α) per edge: rows = edges ``j->i``, columns = ops.

    alphas: [E, K] logits with E = N(N+1)/2.  The caller closes the figure (``add_figure`` does).
    """
    probs = torch.softmax(alphas.detach().float().cpu(), dim=-1).numpy()
    n_edges = probs.shape[0]
    steps = steps_for_edges(n_edges)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ops), 1.0 + 0.22 * n_edges))
    im = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-6, float(probs.max())))
    ax.set_xticks(range(len(ops)), labels=list(ops), rotation=30)
    ax.set_yticks(range(n_edges), labels=edge_labels(steps), fontsize=7)
    ax.set_xlabel("op")
    ax.set_ylabel("edge (from->to node)")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label="softmax(α)")
    fig.tight_layout()
    return fig


def log_alphas(writer, alphas: torch.Tensor, ops: Sequence[str], epoch: int, tag: str = "alphas") -> None:
    """Write the α heatmap (softmax per edge) after ``epoch`` as an image under ``<tag>/softmax``."""
    writer.add_figure(f"{tag}/softmax", alpha_heatmap(alphas, ops, f"softmax(α) after epoch {epoch}"), epoch)


def log_genotype(writer, genotype, step: int) -> None:
    """Write the genotype as text (``genotype``): a readable line and its JSON."""
    writer.add_text("genotype", f"`{genotype}`\n\n```\n{genotype.to_json()}\n```", step)
