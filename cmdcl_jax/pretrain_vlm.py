"""A tiny CLIP pretrained on CausalKitchen frames and captions: a VLM that carries bias.

``python -m cmdcl_jax.pretrain_vlm --config configs/synthetic.py [--out DIR]``

Real CLIP learns from web captions, which name the scene as often as the action and
name the activity a scene is typical of: so it ties backgrounds to activities. This
command gives the tiny CLIP the same habit. Its vision and text towers (the
architecture and word-level tokenizer of :mod:`cmdcl_jax.models.tiny_clip`) are trained
with CLIP's symmetric InfoNCE and a learned logit scale on the frames of the confounded
``train`` split, each paired with a caption of what it shows: the atomic action in the
frame, the background, and sometimes the activity *the background is tied to* (not the
video's own). The vocabulary covers the captions and both tasks' class prompts, so
CMDCL's text side encodes its prompts with it.

The result is written with ``save_pretrained`` plus its tokenizer into
``<dataset.data_dir>/vlm/<kitchen>_<hash of the settings>`` (atomically, with a
manifest) and reused when whole; ``--config.model.clip=<that directory>`` runs CMDCL on
it. ``zero_shot.json`` beside the weights holds its zero-shot accuracy (class prompt
against mean frame embedding for activities, against each frame for atomic actions) on
``test_iid`` and ``test_shifted``, and the activity shortcut rate.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from cmdcl_jax import atomic
from cmdcl_jax.cli import quiet_logs
from cmdcl_jax.data import builders, causal_kitchen, video
from cmdcl_jax.models.clip import Clip
from cmdcl_jax.models.cmdcl import CMDCLConfig
from cmdcl_jax.models.layers import normalize
from cmdcl_jax.models.tiny_clip import TEXT_LENGTH, tiny_clip_config, word_tokenizer

# Caption kinds and their shares: what a frame's caption names. "activity" is the
# activity whose typical background the frame shows, as a web caption names the scene's.
CAPTIONS = {
    "a video of a person {action}.": 0.25,
    "a video of a person {action} in a {background} kitchen.": 0.25,
    "a video of a person {activity} in a {background} kitchen.": 0.2,
    "a video of a person {activity}: {action} in a {background} kitchen.": 0.2,
    "a {background} kitchen.": 0.1,
}
ZERO_SHOT_SPLITS = ("test_iid", "test_shifted")
RESULTS = "zero_shot.json"


def _settings(config: ml_collections.ConfigDict) -> dict:
    """Everything the weights depend on: kitchen, shapes, prompts, captions, recipe."""
    if config.dataset.name != "causal_kitchen":
        raise ValueError(
            f"config.dataset.name={config.dataset.name!r}: the VLM is pretrained on "
            "causal_kitchen only"
        )
    if "vlm" not in config:
        raise ValueError("the config has no `vlm` section (see configs/synthetic.py)")
    return {
        "kitchen": config.dataset.kitchen.to_dict(),
        "image_size": config.dataset.crop_size,
        "width": config.model.width or 32,
        "prompt_template": config.model.prompt_template or CMDCLConfig.prompt_template,
        "captions": CAPTIONS,
        "recipe": config.vlm.to_dict(),
    }


def default_directory(config: ml_collections.ConfigDict) -> Path:
    """``<dataset.data_dir>/vlm/<kitchen config>_<hash of all settings>``."""
    settings = _settings(config)
    spec = causal_kitchen.KitchenSpec(**settings["kitchen"])
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{builders.kitchen_config(spec).name}_w{settings['width']}_{digest}"
    return Path(config.dataset.data_dir) / "vlm" / name


def ensure_pretrained_vlm(config: ml_collections.ConfigDict, out: Path | None = None) -> Path:
    """The pretrained VLM's directory (``out`` or :func:`default_directory`), pretraining
    it first unless a whole one is there (a damaged one is named and rebuilt)."""
    directory = Path(out) if out is not None else default_directory(config)
    if directory.exists():
        damage = atomic.directory_damage(directory)
        if damage is None:
            logging.info("reusing the pretrained VLM in %s", directory)
            return directory
        logging.warning("%s is damaged (%s); pretraining it again", directory, damage)
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_directory(directory, lambda tmp: pretrain(config, tmp))
    return directory


def split_frames(spec: causal_kitchen.KitchenSpec, split: str, size: int) -> tuple:
    """The split's frames resized as CMDCL's evaluation view resizes them (short side
    ``size * 8 / 7``), uint8 [N, T, s, s, 3], and the action in each frame int [N, T]."""
    from tqdm import tqdm

    resize_to = round(size * 8 / 7)
    frames, steps = [], []
    videos = causal_kitchen.render_split(spec, split)
    for clip, frame_steps in tqdm(videos, desc=f"render {split}", total=spec.size(split)):
        frames.append(video.resize(clip, resize_to, resize_to))
        steps.append(frame_steps)
    return np.stack(frames), np.stack(steps)


def _centre(frames: np.ndarray, size: int) -> np.ndarray:
    top = (frames.shape[-3] - size) // 2
    return frames[..., top : top + size, top : top + size, :]


class Captions:
    """Every caption of the kitchen: ``texts`` [M] and the caption index of (kind, action,
    background) ``index`` int [len(CAPTIONS), K, C]; after :meth:`tokenize`, token ``ids``
    and ``mask`` [M, S]."""

    def __init__(self, spec: causal_kitchen.KitchenSpec):
        actions = causal_kitchen.action_names(spec)
        activities = causal_kitchen.activity_names(spec)
        backgrounds = causal_kitchen.background_names(spec)
        texts: dict[str, int] = {}
        self.index = np.zeros((len(CAPTIONS), len(actions), len(backgrounds)), np.int64)
        for i, kind in enumerate(CAPTIONS):
            for a, action in enumerate(actions):
                for z, background in enumerate(backgrounds):
                    text = kind.format(action=action, background=background, activity=activities[z])
                    self.index[i, a, z] = texts.setdefault(text, len(texts))
        self.texts = list(texts)

    def tokenize(self, tokenizer) -> None:
        batch = tokenizer(self.texts, padding=True, return_tensors="np")
        self.ids, self.mask = batch["input_ids"], batch["attention_mask"]


def clip_loss(model: Clip, logit_scale: jax.Array, images: jax.Array, ids, mask) -> jax.Array:
    """CLIP's symmetric InfoNCE over a batch of N (image, caption) pairs, the pairs on the
    diagonal: images uint8 [N, s, s, 3], ids and mask [N, S]."""
    img = normalize(model.vision(model.vision.normalize(images)))  # [N, D]
    txt = normalize(model.text(ids, mask))  # [N, D]
    logits = jnp.exp(jnp.minimum(logit_scale, jnp.log(100.0))) * img @ txt.T  # [N, N]
    labels = jnp.arange(images.shape[0])
    return 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    )


class Pretrainer(nnx.Module):
    """The CLIP being pretrained and its logit scale (log space, CLIP's 1 / 0.07 at first)."""

    def __init__(self, clip: Clip):
        self.clip = clip
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

    def loss(self, images, ids, mask) -> jax.Array:
        return clip_loss(self.clip, self.logit_scale[...], images, ids, mask)


@nnx.jit
def _train_step(model: Pretrainer, optimizer: nnx.Optimizer, images, ids, mask) -> jax.Array:
    loss, grads = nnx.value_and_grad(lambda m: m.loss(images, ids, mask))(model)
    optimizer.update(model, grads)
    return loss


def make_batches(frames, steps, backgrounds, captions: Captions, size: int, batch_size, seed):
    """Endless random training batches: of frames uint8 [N, T, r, r, 3] (r >= ``size``)
    and the action in each [N, T], a random frame cropped to ``size`` at a random place
    and flipped at random, with a caption of a random kind of its action and background
    [N]; yields (images [B, s, s, 3], ids [B, S], mask [B, S])."""
    rng = np.random.default_rng(seed)
    n, t, r = frames.shape[:3]
    kinds = np.arange(len(CAPTIONS))
    shares = np.array(list(CAPTIONS.values()))

    while True:
        v, f = rng.integers(n, size=batch_size), rng.integers(t, size=batch_size)
        top, left = rng.integers(r - size + 1, size=(2, batch_size))
        images = np.stack(
            [
                frames[i, j, y : y + size, x : x + size]
                for i, j, y, x in zip(v, f, top, left, strict=True)
            ]
        )  # [B, s, s, 3]
        flip = rng.random(batch_size) < 0.5
        images[flip] = images[flip, :, ::-1]
        kind = rng.choice(kinds, size=batch_size, p=shares / shares.sum())
        text = captions.index[kind, steps[v, f], backgrounds[v]]
        yield images, captions.ids[text], captions.mask[text]


def pretrain(config: ml_collections.ConfigDict, directory: Path) -> Pretrainer:
    """Pretrains the tiny CLIP on the ``train`` split, writes it, its tokenizer and
    ``zero_shot.json`` to ``directory`` and returns it."""
    from tqdm import tqdm

    settings = _settings(config)
    recipe = config.vlm
    spec = causal_kitchen.KitchenSpec(**settings["kitchen"])
    size, template = settings["image_size"], settings["prompt_template"]
    captions = Captions(spec)
    names = causal_kitchen.activity_names(spec) + causal_kitchen.action_names(spec)
    tokenizer = word_tokenizer([template, *names, *captions.texts], TEXT_LENGTH)
    captions.tokenize(tokenizer)
    cfg = tiny_clip_config(len(tokenizer), image_size=size, width=settings["width"])
    model = Pretrainer(Clip(cfg, rngs=nnx.Rngs(recipe.seed)))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, recipe.learning_rate, recipe.warmup_steps, max(recipe.steps, recipe.warmup_steps + 1)
    )
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)

    start = time.time()
    frames, steps = split_frames(spec, "train", size)
    labels = causal_kitchen.sample_labels(spec, "train")
    batches = make_batches(
        frames, steps, labels.background, captions, size, recipe.batch_size, recipe.seed
    )
    losses = []
    bar = tqdm(range(recipe.steps), desc="pretrain VLM", unit="step", dynamic_ncols=True)
    for step in bar:
        loss = _train_step(model, optimizer, *map(jnp.asarray, next(batches)))
        if step % 50 == 0 or step == recipe.steps - 1:
            losses.append((step, float(loss)))
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
    bar.close()

    directory = Path(directory)
    model.clip.save_pretrained(directory, logit_scale=float(model.logit_scale[...]))
    tokenizer.save_pretrained(directory)
    results = {
        "zero_shot": zero_shot(model.clip, tokenizer, spec, template, size, config),
        "loss": {"first": losses[0][1], "last": losses[-1][1], "every_50_steps": losses},
        "seconds": round(time.time() - start, 1),
        "settings": settings,
    }
    (directory / RESULTS).write_text(json.dumps(results, indent=2))
    return model


def _encode_texts(clip: Clip, tokenizer, texts: list[str]) -> np.ndarray:
    batch = tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    return np.asarray(normalize(clip.text(ids, mask)))  # [M, D]


def zero_shot(clip: Clip, tokenizer, spec, template: str, size: int, config) -> dict:
    """Zero-shot accuracy of ``clip`` with CMDCL's class prompts on each of
    :data:`ZERO_SHOT_SPLITS`: ``activity_acc`` (prompt against the video's mean frame
    embedding), ``activity_shortcut_rate`` (share predicted as the background's activity)
    and ``action_acc`` (prompt against each frame, its shown action the label)."""
    activities = _encode_texts(
        clip, tokenizer, [template.format(n) for n in causal_kitchen.activity_names(spec)]
    )  # [C, D]
    actions = _encode_texts(
        clip, tokenizer, [template.format(n) for n in causal_kitchen.action_names(spec)]
    )  # [K, D]
    encode = jax.jit(lambda x: normalize(clip.vision(clip.vision.normalize(x))))
    out = {}
    for split in ZERO_SHOT_SPLITS:
        frames, steps = split_frames(spec, split, size)
        n, t = steps.shape
        flat = _centre(frames, size).reshape(n * t, size, size, 3)
        emb = np.concatenate([encode(flat[i : i + 1024]) for i in range(0, n * t, 1024)])
        per_video = emb.reshape(n, t, -1).mean(axis=1)  # [N, D]
        predicted = (per_video @ activities.T).argmax(axis=1)
        labels = causal_kitchen.sample_labels(spec, split)
        out[split] = {
            "activity_acc": float((predicted == labels.activity).mean()),
            "activity_shortcut_rate": float((predicted == labels.background).mean()),
            "action_acc": float(((emb @ actions.T).argmax(axis=1) == steps.reshape(-1)).mean()),
            "num_videos": int(n),
        }
    return out


def main(argv):
    del argv
    quiet_logs()
    directory = ensure_pretrained_vlm(flags.FLAGS.config, flags.FLAGS.out)
    results = json.loads((directory / RESULTS).read_text())
    print(json.dumps({"directory": str(directory.absolute()), **results["zero_shot"]}, indent=2))


if __name__ == "__main__":
    # The flags exist only when this is the entry point: as a library
    # (``ensure_pretrained_vlm``) it is imported beside other entry points, such as
    # ``cmdcl_jax.ablate``, that define their own --config.
    config_flags.DEFINE_config_file(
        "config", "configs/synthetic.py", "Run config file (a CausalKitchen one).", lock_config=True
    )
    flags.DEFINE_string("out", None, "Output directory (default: under dataset.data_dir).")
    app.run(main)
