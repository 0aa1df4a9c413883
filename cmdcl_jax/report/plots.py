"""Matplotlib drawings of the report's figures, one function per figure, from the dicts of
``figure_data``; each writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402

CMAP = "BuPu"
EMBEDDINGS = {"clip": "CLIP frame embedding V_P", "video": "video encoder frame embedding"}


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    return plt.subplots(rows, cols, figsize=(width, height), squeeze=False, layout="constrained")


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _matrix(ax, values, rows, cols, title, vmin=0.0, vmax=None, fmt="{:.2f}"):
    """A heatmap with each cell's value written in it (NaN cells grey and blank)."""
    values = np.array(values, dtype=np.float64)
    cmap = plt.get_cmap(CMAP).with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    low, high = image.get_clim()
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            colour = "white" if v > low + 0.6 * (high - low) else "black"
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color=colour)
    return image


def curves(data: dict, title: str, path: Path) -> None:
    """Training loss, and each eval split's main metric, against the step."""
    fig, ((loss_ax, eval_ax),) = _figure(11, 4, cols=2)
    train = data["train"]
    loss_ax.plot(train["step"], train["loss"])
    loss_ax.set(xlabel="step", ylabel="loss", title="training loss")
    for split, curve in data.items():
        metric = next((m for m in ("acc1", "mAP") if m in curve), None)
        if split != "train" and metric is not None:
            eval_ax.plot(curve["step"], curve[metric], marker="o", label=f"{split} {metric}")
    eval_ax.set(xlabel="step", ylabel="metric", title="evaluation", ylim=(0, 1.02))
    eval_ax.set_xlim(loss_ax.get_xlim())  # one step axis, also for a single evaluation
    if eval_ax.lines:
        eval_ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def confusion(data: dict, title: str, path: Path) -> None:
    """The confusion matrix (counts), rows the true class."""
    names = data["classes"]
    fig, ((ax,),) = _figure(2.5 + 0.6 * len(names), 2.0 + 0.55 * len(names))
    image = _matrix(ax, data["counts"], names, names, title, fmt="{:.0f}")
    ax.set(xlabel="predicted", ylabel="true")
    fig.colorbar(image, ax=ax, label="videos")
    _save(fig, path)


def per_class_ap(data: dict, title: str, path: Path) -> None:
    """Horizontal bars of each class's AP."""
    names = data["classes"]
    ap = np.array(data["ap"], dtype=np.float64)
    fig, ((ax,),) = _figure(7, 1.2 + 0.35 * len(names))
    ax.barh(range(len(names)), np.nan_to_num(ap), color="tab:purple")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(ap):
        ax.text(0 if np.isnan(v) else v, i, " n/a" if np.isnan(v) else f" {v:.2f}", va="center")
    ax.set(xlabel="average precision", xlim=(0, 1.12), title=f"{title} (mAP {data['mAP']:.3f})")
    _save(fig, path)


def co_classification(data: dict, title: str, path: Path) -> None:
    """P(row action classified | column action classified), beside the true co-occurrence."""
    names = data["actions"]
    size = 2.5 + 0.42 * len(names)
    fig, axes = _figure(2 * size + 1, size, cols=2)
    panels = (
        (data["classified"], "classified by the model"),
        (data["shown"], "shown in the video (ground truth)"),
    )
    for ax, (values, what) in zip(axes[0], panels, strict=True):
        image = _matrix(ax, values, names, names, f"atomic actions {what}", vmax=1.0)
        ax.set(xlabel="action j", ylabel="action i")
    fig.colorbar(image, ax=axes[0].tolist(), label="P(i | j)", shrink=0.8)
    fig.suptitle(title)
    _save(fig, path)


def matching(panels: list[dict], title: str, path: Path) -> None:
    """Per run (columns, each panel's ``run``) and frame embedding (rows): the mean matching
    probability of the frames showing each atomic action with each activity's text embedding;
    each activity's recipe actions outlined."""
    first = panels[0]
    rows = [f"{a} ({n})" for a, n in zip(first["actions"], first["frames"], strict=True)]
    width, height = 3.8 + 0.34 * len(first["classes"]), 2.8 + 0.34 * len(rows)
    fig, axes = _figure(
        width * len(panels) + 1, height * len(EMBEDDINGS), len(EMBEDDINGS), len(panels)
    )
    for col, data in enumerate(panels):
        for row, (key, embedding) in enumerate(EMBEDDINGS.items()):
            ax = axes[row, col]
            image = _matrix(
                ax, data[key], rows, data["classes"], f"{data['run']}\n{embedding}", vmax=1.0
            )
            ax.set(xlabel="activity text embedding T'", ylabel="atomic action shown (frames)")
            for i, j in zip(*np.nonzero(np.array(data["in_recipe"])), strict=True):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.2))
    fig.colorbar(image, ax=axes.ravel().tolist(), label="mean matching probability", shrink=0.6)
    fig.suptitle(title)
    _save(fig, path)


def tci_scores(data: dict, title: str, path: Path) -> None:
    """S [C, L] of one video: rows the classes (true and predicted marked), columns its
    frames labelled with the atomic action each shows; colours span the values' range."""
    names = [
        f"{n}{' (true)' if i == data['true_class'] else ''}"
        f"{' (predicted)' if i == data['predicted_class'] else ''}"
        for i, n in enumerate(data["classes"])
    ]
    scores = np.array(data["scores"])
    frames = [f"{i}" for i in range(scores.shape[1])]
    if data["frame_actions"] is not None:
        frames = [f"{i}: {a}" for i, a in enumerate(data["frame_actions"])]
    fig, ((ax,),) = _figure(3.5 + 0.6 * len(frames), 2.5 + 0.4 * len(names))
    image = _matrix(
        ax, scores, names, frames, f"{title}\nvideo {data['id']}", vmin=None, fmt="{:.3f}"
    )
    ax.set(xlabel="frame: atomic action shown", ylabel="class text embedding T")
    fig.colorbar(image, ax=ax, label="S (softmax over frames)")
    _save(fig, path)
