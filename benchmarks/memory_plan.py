"""Memory plan of the paper-scale model: per-device memory of the compiled train step.

For ``CMDCLConfig.base()`` (CLIP ViT-B/16, TimeSformer-B/16, STA H=6, Q-Former 2 x 512) at
224 px, it compiles the project's ``train_step`` for each frame count L, batch B and compute
dtype asked for, without ever holding the weights (the model and its Adam state are
abstract shapes), and reads XLA's ``memory_analysis``:

    peak = arguments + outputs - aliased (the donated state) + temporaries

Arguments hold the float32 parameters, Adam's two moments and the uint8 batch; the
temporaries, the activations kept for the backward pass and the gradients.

Rematerialisation (``model.remat``) is compiled and measured only off the CPU: XLA's CPU
pipeline lets common subexpressions merge the recomputation of ``jax.checkpoint`` back into
the forward pass (measured: the compiled step has the same number of dots and the same or
more temporaries with remat), so on a CPU the plan covers ``remat=False`` only; run it on
the card for the remat rows.

The peaks grow nearly affinely with B (activations are per example, the state is not), so
each (dtype, remat, L) is compiled at two or more batch sizes and the largest B that fits
a 24 GB card (RTX 3090) and an 80 GB one (A100/H100), less ``--reserve_gb`` for the
runtime, is read from the line through the two largest (see :func:`line`). The figures
are XLA's plan for the platform it runs on: a GPU compilation fuses differently (and on a
CPU bfloat16 matmuls may run through float32 copies), so measure on the card before you
rely on the last GB.

  python benchmarks/memory_plan.py --out /tmp/memory_plan
  python benchmarks/memory_plan.py --frames 8 --batches 1,4 --dtypes float32
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from cmdcl_jax.models.clip import ClipConfig, ClipTowerConfig
from cmdcl_jax.models.cmdcl import CMDCL, CONFOUNDERS, TRAINABLE, Architectures, CMDCLConfig
from cmdcl_jax.models.timesformer import TimesformerConfig
from cmdcl_jax.run_config import base_config
from cmdcl_jax.train import setup, steps

_FRAMES = flags.DEFINE_list("frames", ["8", "16", "32", "64"], "Frame counts L.")
_BATCHES = flags.DEFINE_list("batches", ["1", "2"], "Two or more per-device batch sizes B.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes.")
_CLASSES = flags.DEFINE_integer("num_classes", 48, "C (Breakfast's actions: 48).")
_RESERVE = flags.DEFINE_float("reserve_gb", 1.0, "Left free on the card for the runtime.")
_OUT = flags.DEFINE_string("out", None, "Writes memory_plan.{md,json} here.")

CARDS = {"24 GB (RTX 3090)": 24, "80 GB (A100/H100)": 80}
GB = 1e9


def base_architectures(cfg: CMDCLConfig) -> Architectures:
    """The shapes of CLIP ViT-B/16 and TimeSformer-B as their checkpoints' configs give them."""
    clip = ClipConfig(
        vision=ClipTowerConfig(768, 3072, 12, 12, image_size=224, patch_size=16),
        text=ClipTowerConfig(512, 2048, 12, 8),
        projection_dim=512,
    )
    return Architectures(clip, cfg.timesformer_arch, cfg.qformer)


def abstract_run(dtype: str, remat: bool, frames: int, num_classes: int):
    """(graphdef, abstract state, abstract frozen CLIP, optimizer) of base(), no weights."""
    cfg = CMDCLConfig.base(
        timesformer="",
        timesformer_arch=TimesformerConfig.base(),
        num_frames=frames,
        dtype=dtype,
        remat=remat,
    )
    model = nnx.eval_shape(
        lambda: CMDCL(cfg, base_architectures(cfg), num_classes, rngs=nnx.Rngs(0))
    )
    graphdef, params, confounders, frozen = nnx.split(model, TRAINABLE, CONFOUNDERS, ...)
    tx = setup.make_optimizer(base_config().train, num_steps=1000)
    state = jax.eval_shape(lambda p, c: steps.initial_state(p, c, tx), params, confounders)
    return graphdef, state, frozen, tx


def abstract_batch(frames: int, batch: int) -> dict:
    return {
        "video": jax.ShapeDtypeStruct((batch, frames, 224, 224, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }


def compiled_memory(dtype: str, remat: bool, frames: int, batch: int, num_classes: int) -> dict:
    """XLA's memory analysis of the train step: bytes by kind, and "peak"."""
    graphdef, state, frozen, tx = abstract_run(dtype, remat, frames, num_classes)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (state, frozen, abstract_batch(frames, batch), key)
    static = dict(graphdef=graphdef, tx=tx, kind="single", accum_steps=1)
    m = steps.train_step.lower(*args, **static).compile().memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def line(points: dict[int, float]) -> tuple[float, float]:
    """(intercept, slope) of the line through the two largest B of {B: bytes}: the bytes per
    example grow slightly with B (L=8, float32: 2.75 GB from B=1 to 2, 3.11 from 2 to 4),
    so the largest batches give the closest extrapolation."""
    (b0, y0), (b1, y1) = sorted(points.items())[-2:]
    slope = (y1 - y0) / (b1 - b0)
    return y1 - slope * b1, slope


def largest_batch(intercept: float, slope: float, budget_gb: float, limit: int = 64) -> str:
    """The largest B <= ``limit`` whose peak on ``line`` fits ``budget_gb``; "0" when none."""
    if intercept + slope > budget_gb * GB:
        return "0"
    fits = int((budget_gb * GB - intercept) // slope) if slope > 0 else limit
    return f">= {limit}" if fits >= limit else str(fits)


def report(rows: list[dict], reserve_gb: float) -> str:
    lines = [
        f"platform: {jax.devices()[0].platform}, jax {jax.__version__}",
        "",
        "| dtype | remat | L | B | state + batch (GB) | temporaries (GB) | peak (GB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['remat']} | {r['frames']} | {r['batch']} "
            f"| {r['arguments'] / GB:.2f} | {r['temporaries'] / GB:.2f} | {r['peak'] / GB:.2f} |"
        )
        groups.setdefault((r["dtype"], r["remat"], r["frames"]), []).append(r)
    lines += [
        "",
        f"Largest per-device batch that fits (peak + {reserve_gb:g} GB reserve), from the line "
        "through the two largest measured batch sizes:",
        "",
        "| dtype | remat | L | per-example (GB) | " + " | ".join(CARDS) + " |",
        "| --- | --- | --- | --- |" + " --- |" * len(CARDS),
    ]
    for (dtype, remat, frames), group in groups.items():
        intercept, slope = line({r["batch"]: r["peak"] for r in group})
        cells = [largest_batch(intercept, slope, gb - reserve_gb) for gb in CARDS.values()]
        lines.append(
            f"| {dtype} | {remat} | {frames} | {slope / GB:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv) -> None:
    del argv
    batches = sorted({int(b) for b in _BATCHES.value})
    if len(batches) < 2:
        raise app.UsageError("--batches: give at least two batch sizes (a line needs two)")
    for dtype in _DTYPES.value:
        if dtype not in ("float32", "bfloat16"):
            raise app.UsageError(f"--dtypes {dtype!r}: expected float32 or bfloat16")
    remats = (False,) if jax.devices()[0].platform == "cpu" else (False, True)
    rows = []
    for dtype in _DTYPES.value:
        for remat in remats:
            for frames in (int(f) for f in _FRAMES.value):
                for batch in batches:
                    start = time.perf_counter()
                    row = {"dtype": dtype, "remat": remat, "frames": frames, "batch": batch}
                    row.update(compiled_memory(dtype, remat, frames, batch, _CLASSES.value))
                    rows.append(row)
                    print(
                        f"{dtype} remat={remat} L={frames} B={batch}: peak "
                        f"{row['peak'] / GB:.2f} GB ({time.perf_counter() - start:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    text = report(rows, _RESERVE.value)
    print(text)
    if _OUT.value:
        out = Path(_OUT.value)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory_plan.md").write_text(text)
        (out / "memory_plan.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    app.run(main)
