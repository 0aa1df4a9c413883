"""A trained model's outputs on a whole split, the per-frame ones included.

The frames are those of evaluation (the middle frame of each of L segments, short side
resized, centre crop), read straight from the split's shards in example order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cmdcl_jax.data import causal_kitchen, pipeline
from cmdcl_jax.data.transforms import EvalTransform, segment_indices
from cmdcl_jax.models.layers import normalize


@dataclasses.dataclass
class SplitOutputs:
    """One split's outputs, N examples in the split's order.

    Attributes:
        ids: [N] example ids.
        logits: float32 [N, C].
        labels: int [N] (single-label) or 0/1 [N, C] (multi-label).
        matching_clip: float32 [N, L, C], per frame the softmax over classes of
            cos(V_P[l], T'[c]) / tau_t: how well the frame's CLIP embedding matches each
            class's text embedding T' (debiased with TCI, else the learned table T).
        matching_video: float32 [N, L, C], the same with the video encoder's frame
            embedding that meets T' in the classifier (VH with VCI, else V) for V_P.
        scores: float32 [N, C, L], TCI's bias-aware scores S; None without TCI.
        actions: 0/1 [N, K], the atomic actions each video shows; None if not CausalKitchen.
        frame_actions: int [N, L], the atomic action each sampled frame shows; None if not
            CausalKitchen.
    """

    ids: list[str]
    logits: np.ndarray
    labels: np.ndarray
    matching_clip: np.ndarray
    matching_video: np.ndarray
    scores: np.ndarray | None
    actions: np.ndarray | None
    frame_actions: np.ndarray | None


@nnx.jit
def _forward(model, video):
    """Logits [B, C], matching_clip and matching_video [B, L, C], S [B, C, L] or None, of
    uint8 video [B, L, H, W, 3]."""
    logits, aux = model(video)
    tau_t, _ = model.temperatures()
    text = normalize(aux["text"])  # [B, C, D]
    frames_video = aux.get("frames_sta", aux["frames_video"])  # [B, L, D]
    matching = [
        jax.nn.softmax(jnp.einsum("bld,bcd->blc", normalize(frames), text) / tau_t, axis=-1)
        for frames in (aux["frames_clip"], frames_video)
    ]
    return logits, *matching, aux.get("scores")


def collect(model: nnx.Module, run: dict, data_dir: str, split: str, batch_size: int):
    """Runs ``model`` over every example of ``split``: a :class:`SplitOutputs`.

    Batches are padded to ``batch_size`` (one compiled shape); progress is printed.
    """
    dataset, task, config = run["dataset"], run["task"], run["data_config"]
    source = pipeline.open_split(dataset, data_dir, split, config)
    num_frames, crop = run["inference"]["num_frames"], run["inference"]["crop_size"]
    transform = EvalTransform(num_frames, crop, round(crop * 8 / 7))
    kitchen = dataset == "causal_kitchen"
    shown = None
    if kitchen:
        metadata = pipeline.load_builder(dataset, data_dir, config).info.metadata
        shown = causal_kitchen.frame_actions(causal_kitchen.KitchenSpec(**metadata["spec"]), split)
    n = len(source)
    ids, labels, actions, frame_actions, outputs = [], [], [], [], []
    for start in range(0, n, batch_size):
        examples = [source[i] for i in range(start, min(start + batch_size, n))]
        video = np.stack([transform.map({"frames": e["frames"]})["video"] for e in examples])
        pad = batch_size - len(examples)
        video = np.concatenate([video, np.repeat(video[:1], pad, axis=0)])
        out = jax.device_get(_forward(model, video))
        outputs.append([None if x is None else np.asarray(x)[: len(examples)] for x in out])
        for e in examples:
            ids.append(e["id"].decode() if isinstance(e["id"], bytes) else str(e["id"]))
            labels.append(e[task])
            if kitchen:
                actions.append(e["actions"])
                stored = shown[ids[-1]]
                frame_actions.append(stored[segment_indices(len(stored), num_frames)])
        print(f"{split}: {len(ids)}/{n} examples", end="\r", flush=True)
    print()
    logits, matching_clip, matching_video, scores = (
        None if outputs[0][i] is None else np.concatenate([o[i] for o in outputs]) for i in range(4)
    )
    return SplitOutputs(
        ids=ids,
        logits=logits,
        labels=np.stack(labels),
        matching_clip=matching_clip,
        matching_video=matching_video,
        scores=scores,
        actions=np.stack(actions) if kitchen else None,
        frame_actions=np.stack(frame_actions) if kitchen else None,
    )
