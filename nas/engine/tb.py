"""TensorBoard logging helpers (torch.utils.tensorboard) and α plots (matplotlib, Agg backend)."""
from __future__ import annotations

from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # headless: figures are rendered to images, never shown
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nas.genotype import steps_for_edges  # noqa: E402


def edge_labels(steps: int) -> list:
    """Row labels of α for a DAG with ``steps`` intermediate nodes: ``"j->i"``, in α's row order."""
    return [f"{j}->{i}" for i in range(1, steps + 1) for j in range(i)]


def alpha_heatmap(alphas: torch.Tensor, ops: Sequence[str], title: str = "", row_labels=None):
    """A matplotlib Figure of softmax(α) per edge: rows = edges ``j->i``, columns = ops.

    alphas: [E, K] logits with E = N(N+1)/2, or any number of rows named by ``row_labels`` (a space whose α rows
    are not DAG edges: stacked_rnn's layers).  The caller closes the figure (``add_figure`` does).
    """
    probs = torch.softmax(alphas.detach().float().cpu(), dim=-1).numpy()
    n_edges = probs.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ops), 1.0 + 0.22 * n_edges))
    # the colour scale spans the values shown (u01 item 9: from 0, a nearly uniform α was one flat colour); the
    # colour bar gives the scale
    low, high = float(probs.min()), float(probs.max())
    if high - low < 1e-6:
        low, high = low - 5e-7, high + 5e-7
    im = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(len(ops)), labels=list(ops), rotation=30)
    ax.set_yticks(range(n_edges), labels=row_labels or edge_labels(steps_for_edges(n_edges)), fontsize=7)
    ax.set_xlabel("op")
    ax.set_ylabel("α row" if row_labels else "edge (from->to node)")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label="softmax(α)")
    fig.tight_layout()
    return fig


def log_alphas(writer, alphas: torch.Tensor, ops: Sequence[str], epoch: int, tag: str = "alphas",
               row_labels=None) -> None:
    """Write the α heatmap (softmax per edge, or per row named by ``row_labels``) after ``epoch`` as an image under
    ``<tag>/softmax``."""
    writer.add_figure(f"{tag}/softmax", alpha_heatmap(alphas, ops, f"softmax(α) after epoch {epoch}", row_labels),
                      epoch)


def op_share_figure(history: list, ops: Sequence[str]):
    """A stacked-area Figure of each op's share of softmax(α) over the epochs (``history``: the search's per-epoch
    records with ``diagnostics.op_shares``; :mod:`nas.diagnostics`).  The caller closes the figure."""
    rows = [h for h in history if h.get("diagnostics")]
    epochs = [h["epoch"] for h in rows]
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    if rows:
        ax.stackplot(epochs, [[h["diagnostics"]["op_shares"][op] for h in rows] for op in ops], labels=list(ops))
        ax.set_xlim(epochs[0], max(epochs[-1], epochs[0] + 1))
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of softmax(α)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return fig


def log_genotype(writer, genotype, step: int) -> None:
    """Write the genotype as text (``genotype``): a readable line and its JSON."""
    writer.add_text("genotype", f"`{genotype}`\n\n```\n{genotype.to_json()}\n```", step)


def genotype_figure(genotype, title: str = ""):
    """A matplotlib Figure of a genotype's DAG: nodes left to right (0 = input), one arrow per kept edge
    labelled with its op (and its node's params, e.g. a stacked_rnn layer's ``128u p=0.25 bi``: units, dropout,
    bidirectional), and the output node fed by the ``concat`` nodes.  The caller closes the figure."""
    n = genotype.steps + 1
    fig, ax = plt.subplots(figsize=(1.0 + 1.5 * n, 1.6 + 0.5 * n))
    xs = {i: float(i) for i in range(n)}
    xs["out"] = float(n)
    for i in range(n):
        ax.text(xs[i], 0.0, "in" if i == 0 else str(i), ha="center", va="center", fontsize=11, zorder=3,
                bbox=dict(boxstyle="circle", fc="#cfe2f3" if i else "#d9ead3", ec="black"))
    ax.text(xs["out"], 0.0, "out", ha="center", va="center", fontsize=10, zorder=3,
            bbox=dict(boxstyle="round", fc="#fce5cd", ec="black"))
    for i, node in enumerate(genotype.nodes, start=1):
        for e in node:
            span = i - e.input
            rad = 0.0 if span == 1 else -0.35  # arcs above the axis; equal aspect keeps them circular
            ax.annotate("", xy=(xs[i] - 0.12, 0.0), xytext=(xs[e.input] + 0.12, 0.0), zorder=1,
                        arrowprops=dict(arrowstyle="-|>", lw=1.3, connectionstyle=f"arc3,rad={rad}"))
            height = -rad * span / 2  # a quadratic Bezier's apex sits halfway to its control point
            ax.text((xs[i] + xs[e.input]) / 2, height + 0.06, e.op + _params_label(genotype.node_params(i)),
                    ha="center", va="bottom", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85), zorder=2)
    for c in genotype.concat:
        span = n - c
        rad = 0.0 if span == 1 else 0.35  # below the axis
        ax.annotate("", xy=(xs["out"] - 0.18, 0.0), xytext=(xs[c] + 0.12, 0.0), zorder=1,
                    arrowprops=dict(arrowstyle="-|>", lw=1.0, ls="--", color="gray",
                                    connectionstyle=f"arc3,rad={rad}"))
    ax.set_aspect("equal")
    ax.set_xlim(-0.6, n + 0.6)
    ax.set_ylim(-0.4 - 0.18 * n, 0.5 + 0.18 * n)
    ax.axis("off")
    ax.set_title(title or f"{genotype.space} genotype")
    fig.tight_layout()
    return fig


def _params_label(params: dict) -> str:
    """A node's params in a few characters, on a second line: ``128u`` units, ``p=0.25`` dropout, ``bi``
    bidirectional, ``key=value`` for anything else; empty for none."""
    parts = []
    for key, value in params.items():
        if key == "units":
            parts.append(f"{value}u")
        elif key == "dropout":
            parts.append(f"p={value:g}")
        elif key == "bidirectional":
            parts += ["bi"] if value else []
        else:
            parts.append(f"{key}={value}")
    return "\n" + " ".join(parts) if parts else ""


def log_genotype_figure(writer, genotype, step: int, png_path: str | None = None, tag: str = "genotype/dag") -> None:
    """The genotype's DAG picture as a TensorBoard image (``tag``) and, with ``png_path``, a PNG file."""
    import os

    fig = genotype_figure(genotype)
    if png_path is not None:
        os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
        tmp = png_path + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, png_path)  # atomic: a reader never sees half a PNG
    writer.add_figure(tag, fig, step)


# -- the scalar tags each script writes, and a writer that writes only what a checkpoint covers ------------------
#: every scalar tag each entry point writes, over all its modes (language model or SST-2, one-shot or black-box
#: search, any ``nan_policy``); the README's TensorBoard table lists the same (``tests/test_tb.py`` checks both
#: directions, and :class:`CommittedWriter` refuses any other tag).  Steps: the run's training step for every tag
#: except ``search/*`` (cumulative training tokens, whole wall seconds, the trial number) and ``faults/*`` (the
#: rollback's number).
SCALAR_TAGS = {
    "search.py": (
        "train/loss", "train/ppl", "train/epoch_ppl", "valid/ppl", "valid/loss",            # language model
        "train/accuracy", "train/epoch_accuracy", "valid/accuracy",                          # SST-2
        "lr/weights", "lr/alphas",
        "search/best_vs_tokens", "search/best_vs_seconds", "search/value",
        "faults/rollback_lr_scale",
        # the collapse diagnostics (nas.diagnostics); ``/*``: one tag per op of the space
        "diagnostics/op_share/*", "diagnostics/op_count/*", "diagnostics/edge_entropy_mean",
        "diagnostics/edge_entropy_min", "diagnostics/parameter_free_genotype", "diagnostics/parameter_free_mass",
        "diagnostics/min_lead", "diagnostics/hessian_eigenvalue", "diagnostics/hessian_seconds",
    ),
    "train.py": (
        "train/loss", "train/ppl", "train/epoch_ppl", "valid/ppl", "valid/loss", "test/ppl", "test/loss",
        "train/accuracy", "train/epoch_accuracy", "valid/accuracy", "test/accuracy",
        "lr", "optim/averaged",
        "faults/rollback_lr_scale", "faults/reload_best_epoch",
    ),
}
#: the other (text and image) tags: ``config`` and ``genotype`` are stored by TensorBoard as ``<tag>/text_summary``
OTHER_TAGS = {
    "search.py": ("config", "genotype", "genotype/dag", "genotype/final_dag", "alphas/softmax",
                  "diagnostics/op_shares"),
    "train.py": ("config", "genotype", "genotype/dag"),
}


def scalar_tag_allowed(tag: str, tags) -> bool:
    """Whether scalar ``tag`` is one of ``tags`` (:data:`SCALAR_TAGS`' form: ``prefix/*`` allows any tag under
    ``prefix/``)."""
    return tag in tags or any(t.endswith("/*") and tag.startswith(t[:-1]) for t in tags)


class CommittedWriter:
    """A ``SummaryWriter`` whose events reach the event file only once a resume checkpoint covers them.

    Calls to ``add_*`` are kept in memory until :meth:`commit` (the run's :class:`~nas.engine.resume.Keeper` commits
    right after each checkpoint is written, and the engine once more at the successful end);
    :meth:`discard` drops them.  So the events on disk never run ahead of the checkpoint: a resume after a kill
    and a ``nan_policy=rollback``, which both go back to the checkpoint's step, write each step once, with no
    purge (TensorBoard's purge removes *every* tag's events past a step, whatever axis a tag uses, e.g. the
    token axis of ``search/best_vs_tokens``).  The cost: TensorBoard shows a run's progress at its checkpoints
    (every ``checkpoint_every`` steps and each epoch end), and a SIGKILL loses the events since the last one,
    as it loses the steps.

    ``tags``: the scalar tags allowed (:data:`SCALAR_TAGS` of the script; ``prefix/*`` allows every tag under
    ``prefix/``); another tag raises ValueError, a programming error caught by the tests.
    """

    def __init__(self, writer, tags):
        self.writer, self.tags, self.pending = writer, frozenset(tags), []

    def add_scalar(self, tag: str, value, step: int) -> None:
        if not scalar_tag_allowed(tag, self.tags):
            raise ValueError(f"TensorBoard scalar tag {tag!r} is not in nas.engine.tb.SCALAR_TAGS for this script; "
                             "add it there and to the README's TensorBoard table")
        self.pending.append(("add_scalar", (tag, value, step), {}))

    def __getattr__(self, name):
        if name.startswith("add_"):  # add_text, add_figure, ...: kept like scalars
            return lambda *args, **kwargs: self.pending.append((name, args, kwargs))
        return getattr(self.writer, name)

    def flush(self) -> None:
        """Nothing to do: events are written by :meth:`commit`."""

    def commit(self) -> None:
        """Write the kept events and flush them to the event file."""
        pending, self.pending = self.pending, []
        for name, args, kwargs in pending:
            getattr(self.writer, name)(*args, **kwargs)
        self.writer.flush()

    def discard(self) -> None:
        """Drop the kept events (closing the matplotlib figures among them)."""
        from matplotlib.figure import Figure

        for _, args, kwargs in self.pending:
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, Figure):
                    plt.close(arg)
        self.pending = []

    def close(self) -> None:
        """Drop what no checkpoint covers (an error or a stop ended the run) and close the event file."""
        self.discard()
        self.writer.close()
