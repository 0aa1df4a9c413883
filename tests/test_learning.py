"""Every Table 3 variant learns: the training loss on 16 unconfounded CausalKitchen videos
falls well below ln C (the regression test for the VCI path's trainability)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cmdcl_jax.data import causal_kitchen as ck
from cmdcl_jax.models.cmdcl import CONFOUNDERS, TRAINABLE, CMDCLConfig, build_cmdcl
from cmdcl_jax.models.tiny_clip import write_tiny_clip
from cmdcl_jax.train import setup, steps

SPEC = ck.KitchenSpec(
    seed=1, num_train=16, num_frames=8, frame_size=32, background_bias=1 / 8, salt_bias=0.5
)
STEPS = 150


@pytest.fixture(scope="module")
def videos():
    examples = [e for _, e in ck.generate(SPEC, "train")]
    frames = np.stack([e["frames"] for e in examples])  # [N, L, S, S, 3]
    labels = np.array([e["activity"] for e in examples], np.int32)
    return jnp.asarray(frames), jnp.asarray(labels)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    names = ck.activity_names(SPEC)
    template = CMDCLConfig.tiny(clip="").prompt_template
    return str(write_tiny_clip(tmp_path_factory.mktemp("clip"), [template, *names]))


@pytest.mark.parametrize("tci,vci", [(False, False), (True, False), (False, True), (True, True)])
def test_every_variant_fits_unconfounded_videos(videos, clip_dir, tci, vci):
    frames, labels = videos
    cfg = CMDCLConfig.tiny(clip_dir, tci=tci, vci=vci)
    model = build_cmdcl(cfg, ck.activity_names(SPEC), seed=0)
    graphdef, params, confounders, frozen = nnx.split(model, TRAINABLE, CONFOUNDERS, ...)
    hparams = ml_collections.ConfigDict(
        dict(learning_rate=3e-3, warmup_steps=10, grad_clip=1.0, adam_b1=0.9, adam_b2=0.999)
    )
    tx = setup.make_optimizer(hparams, STEPS)
    state = steps.initial_state(params, confounders, tx)
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        pick = rng.choice(len(labels), 8, replace=False)
        batch = {"video": frames[pick], "label": labels[pick]}
        state, m = steps.train_step(
            state, frozen, batch, key, graphdef=graphdef, tx=tx, kind="single", accum_steps=1
        )
        losses.append(m["loss"])
    logits = steps.eval_step(state["params"], frozen, frames, graphdef=graphdef)
    loss = float(steps.loss_fn(logits, labels, "single"))
    chance = np.log(SPEC.num_activities)
    first = float(np.mean(jax.device_get(losses[:5])))
    assert first > 0.8 * chance  # it starts near chance ...
    # ... and fits: measured 0.014-0.028 ln C. Before the fixes, in 300 steps: with g's
    # skip on T' ("anchor") the VCI variants stayed at 0.68-0.75 ln C; with BERT's init
    # std at width 32, Variant 1 reached 0.14 ln C.
    assert loss < 0.3 * chance, (loss, [float(x) for x in losses[::25]])
