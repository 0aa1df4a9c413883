"""The report: each figure's data computed, drawn as PNG, and listed in ``figures.json``."""

from __future__ import annotations

import json
from pathlib import Path

from cmdcl_jax import atomic
from cmdcl_jax.data import causal_kitchen, pipeline
from cmdcl_jax.report import figure_data, plots
from cmdcl_jax.report.split_outputs import collect
from cmdcl_jax.train import metrics_log
from cmdcl_jax.train.checkpoints import Checkpoints
from cmdcl_jax.train.trained_model import load_model

VARIANTS = {(False, False): "Variant 1", (True, False): "Variant 2", (False, True): "Variant 3"}


def variant(run: dict) -> str:
    """The paper's name (Table 3) of the run's model: CMDCL or Variant 1-3."""
    return VARIANTS.get((run["model"]["tci"], run["model"]["vci"]), "CMDCL")


def logged(lines: list[dict], step: int, split: str) -> dict | None:
    """The evaluation of ``split`` logged at ``step``: the training run's, else the last
    ``--mode=eval`` one; None if neither."""
    for name in (split, f"eval_{split}"):
        found = [x for x in lines if x["step"] == step and x["split"] == name]
        if found:
            return found[-1]
    return None


def restore(workdir: Path, step: int | None):
    """(model, run.json, step) of the newest readable checkpoint, or of ``step``."""
    if step is None:
        step = Checkpoints(workdir, read_only=True).latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint")
    model, run = load_model(workdir, step)
    return model, run, step


def run_outputs(workdir: Path, step, split: str, data_dir: str | None):
    """(run.json, step, SplitOutputs of ``split``, the data dir read) of a run's checkpoint."""
    model, run, step = restore(workdir, step)
    data_dir = data_dir or run["config"]["dataset"]["data_dir"]
    batch = run["config"]["eval"]["batch_size"]
    return run, step, collect(model, run, data_dir, split, batch), data_dir


def make_report(
    workdir: Path,
    out: Path,
    split: str,
    *,
    compare: Path | None = None,
    step: int | None = None,
    data_dir: str | None = None,
    video: int = 0,
) -> dict:
    """Writes the PNGs and ``figures.json`` into ``out``; returns ``figures.json``'s content."""
    out.mkdir(parents=True, exist_ok=True)
    lines = metrics_log.read_lines(workdir / "metrics.jsonl")
    if not lines:
        raise FileNotFoundError(f"{workdir / 'metrics.jsonl'}: missing or empty")
    run, step, outputs, data_dir = run_outputs(workdir, step, split, data_dir)
    name, kind, classes = variant(run), run["kind"], run["class_names"]
    title = f"{variant(run)}, step {step}, {split}"
    figures: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    actions = None  # atomic action names, on CausalKitchen

    def add(key: str, data: dict, draw) -> None:
        png = out / f"{key}.png"
        draw(data, png)
        figures[key] = {"png": png.name, "data": data}

    add(
        "curves",
        figure_data.training_curves(lines),
        lambda d, p: plots.curves(d, f"{name} ({workdir.name})", p),
    )
    if kind == "single":
        data = figure_data.confusion(outputs, classes)
        add("confusion", data, lambda d, p: plots.confusion(d, f"{title}: confusion", p))
    else:
        skipped["confusion"] = "multi-label task"
    data = figure_data.per_class_ap(outputs, classes, kind)
    add("per_class_ap", data, lambda d, p: plots.per_class_ap(d, f"{title}: AP per class", p))

    if run["dataset"] == "causal_kitchen":
        metadata = pipeline.load_builder(run["dataset"], data_dir, run["data_config"]).info.metadata
        spec = causal_kitchen.KitchenSpec(**metadata["spec"])
        actions = causal_kitchen.action_names(spec)
        recipes = causal_kitchen.recipe_actions(spec)
        data = figure_data.co_classification(outputs, kind, actions, recipes)
        add(
            "co_classification",
            data,
            lambda d, p: plots.co_classification(d, f"{title}: P(action i | action j)", p),
        )
        panels = [
            {
                "run": f"{name} ({workdir.name}, step {step})",
                **figure_data.matching(outputs, classes, actions, recipes),
            }
        ]
        if compare is not None:
            other_run, other_step, other, _ = run_outputs(compare, None, split, data_dir)
            if other_run["class_names"] != classes:
                raise ValueError(f"{compare}: classes differ from {workdir}'s")
            label = f"{variant(other_run)} ({compare.name}, step {other_step})"
            panels.insert(
                0, {"run": label, **figure_data.matching(other, classes, actions, recipes)}
            )
        add(
            "matching",
            {"panels": panels},
            lambda d, p: plots.matching(d["panels"], f"matching probabilities, {split}", p),
        )
    else:
        skipped["co_classification"] = skipped["matching"] = "needs per-frame atomic actions"

    if outputs.scores is not None:
        if not 0 <= video < len(outputs.ids):
            raise ValueError(f"--video={video} not in 0..{len(outputs.ids) - 1}")
        data = figure_data.tci_scores(outputs, video, classes, actions)
        add("tci_scores", data, lambda d, p: plots.tci_scores(d, f"{title}: TCI scores S", p))
    else:
        skipped["tci_scores"] = "the run has no TCI (model.tci=False)"

    report = {
        "workdir": str(workdir),
        "compare": None if compare is None else str(compare),
        "variant": name,
        "split": split,
        "step": step,
        "logged": logged(lines, step, split),
        "figures": figures,
        "skipped": skipped,
    }
    atomic.write_text(out / "figures.json", json.dumps(report, indent=1))
    return report
