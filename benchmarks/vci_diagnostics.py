r"""Diagnostics of the VCI path: does the video reach the logits, and does it train?

Builds the tiny model on unconfounded CausalKitchen videos (rendered in memory, 32 px, 8
frames), trains it with the project's train step, and prints at initialisation and every
--every steps, on a fixed probe batch:

* ``grad/<module>``: the gradient norm of each trainable module;
* ``|T'|``, ``|V'|``, ``|Vhat|``, ``|g.mlp|``: mean norms of the debiased text, the
  deconfounded video tokens, the pooled evidence and g's MLP branch;
* ``V'_video_share``: the share of V''s variance that is across videos (per class and
  channel), against its variance over videos and classes; near 0 means V' does not
  depend on the video;
* ``SF_entropy``: entropy over frames of the fine-grained scores SF, over log L (1 is
  uniform pooling, 0 a hard argmax); ``logit_std``: std of the logits across videos.

  python benchmarks/vci_diagnostics.py --tci --vci --g_residual anchor --steps 200
"""

from __future__ import annotations

import json
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from cmdcl_jax.data import causal_kitchen as ck
from cmdcl_jax.models.cmdcl import CONFOUNDERS, TRAINABLE, CMDCLConfig, build_cmdcl
from cmdcl_jax.models.tiny_clip import write_tiny_clip
from cmdcl_jax.train import setup, steps

_TCI = flags.DEFINE_bool("tci", True, "Textual causal intervention.")
_VCI = flags.DEFINE_bool("vci", True, "Visual causal intervention.")
_G_RESIDUAL = flags.DEFINE_string("g_residual", "evidence", "CMDCLConfig.g_residual.")
_TEXT_SCALE = flags.DEFINE_string("text_scale", "rms", "CMDCLConfig.text_scale.")
_TAU_V = flags.DEFINE_float("tau_v", 0.07, "CMDCLConfig.tau_v.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps.")
_EVERY = flags.DEFINE_integer("every", 50, "Print every this many steps.")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (cosine, 10 warm-up).")
_VIDEOS = flags.DEFINE_integer("videos", 64, "Training videos.")
_SEED = flags.DEFINE_integer("seed", 0, "Model and batch-order seed.")


def probe(graphdef, params, frozen, video, labels) -> dict:
    """The statistics of the module docstring on one batch."""
    model = nnx.merge(graphdef, params, frozen)
    logits, aux = model(video, fine_scores=model.sta is not None)
    text, tokens = aux["text"], aux["video"]  # [B, C, D], [B, C or L, D]
    out = {
        "|T'|": jnp.linalg.norm(text, axis=-1).mean(),
        "|V'|": jnp.linalg.norm(tokens, axis=-1).mean(),
        "V'_video_share": tokens.var(axis=0).mean()
        / tokens.reshape(-1, tokens.shape[-1]).var(axis=0).mean(),
        "logit_std": logits.std(axis=0).mean(),
    }
    if model.sta is not None:
        sf = aux["fine_scores"]  # [B, C, L, D]
        entropy = -(sf * jnp.log(sf + 1e-12)).sum(axis=2) / np.log(sf.shape[2])
        branch = model.vci_g.mlp(jnp.concatenate([text, aux["vhat"]], axis=-1))
        out.update(
            {
                "SF_entropy": entropy.mean(),
                "|Vhat|": jnp.linalg.norm(aux["vhat"], axis=-1).mean(),
                "|g.mlp|": jnp.linalg.norm(branch, axis=-1).mean(),
            }
        )

    def loss(p):
        return steps.loss_fn(nnx.merge(graphdef, p, frozen)(video)[0], labels, "single")

    grads = jax.grad(loss)(params)
    squares: dict[str, float] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        top = f"grad/{path[0].key}"
        squares[top] = squares.get(top, 0.0) + float(jnp.sum(jnp.square(leaf)))
    out.update({k: v**0.5 for k, v in sorted(squares.items())})
    return {k: round(float(v), 5) for k, v in out.items()}


def main(argv):
    del argv
    spec = ck.KitchenSpec(
        seed=1,
        num_train=_VIDEOS.value,
        num_frames=8,
        frame_size=32,
        background_bias=1 / 8,
        salt_bias=0.5,
    )
    examples = [e for _, e in ck.generate(spec, "train")]
    frames = jnp.asarray(np.stack([e["frames"] for e in examples]))  # [N, 8, 32, 32, 3]
    labels = jnp.asarray([e["activity"] for e in examples], jnp.int32)
    names = ck.activity_names(spec)
    clip_dir = tempfile.mkdtemp()
    write_tiny_clip(clip_dir, [CMDCLConfig.tiny(clip="").prompt_template, *names])
    cfg = CMDCLConfig.tiny(
        clip_dir,
        tci=_TCI.value,
        vci=_VCI.value,
        g_residual=_G_RESIDUAL.value,
        text_scale=_TEXT_SCALE.value,
        tau_v=_TAU_V.value,
    )
    model = build_cmdcl(cfg, names, seed=_SEED.value)
    graphdef, params, confounders, frozen = nnx.split(model, TRAINABLE, CONFOUNDERS, ...)
    hparams = ml_collections.ConfigDict(
        dict(learning_rate=_LR.value, warmup_steps=10, grad_clip=1.0, adam_b1=0.9, adam_b2=0.999)
    )
    tx = setup.make_optimizer(hparams, _STEPS.value)
    state = steps.initial_state(params, confounders, tx)
    key, rng = jax.random.key(_SEED.value), np.random.default_rng(_SEED.value)
    probe_batch = (frames[:16], labels[:16])
    print("step 0:", json.dumps(probe(graphdef, state["params"], frozen, *probe_batch)))
    losses = []
    for step in range(1, _STEPS.value + 1):
        pick = rng.choice(len(labels), 16, replace=False)
        state, metrics = steps.train_step(
            state,
            frozen,
            {"video": frames[pick], "label": labels[pick]},
            key,
            graphdef=graphdef,
            tx=tx,
            kind="single",
            accum_steps=1,
        )
        losses.append(metrics["loss"])
        if step % _EVERY.value == 0:
            stats = probe(graphdef, state["params"], frozen, *probe_batch)
            logits = steps.eval_step(state["params"], frozen, frames, graphdef=graphdef)
            accuracy = float((logits.argmax(axis=1) == labels).mean())
            mean_loss = float(np.mean(jax.device_get(losses[-_EVERY.value :])))
            print(f"step {step}: loss {mean_loss:.3f} train_acc {accuracy:.3f}", json.dumps(stats))


if __name__ == "__main__":
    app.run(main)
