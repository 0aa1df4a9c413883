"""Per-example code that runs in grain workers: example access, frame sampling and crops.

This module imports no JAX, so that grain worker processes start quickly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grain
import numpy as np

from cmdcl_jax.data import video


class LabelledFrames:
    """A random-access view of some examples of a TFDS data source, with one task's label.

    Element `i` is example `indices[i]` as {"frames", "label", "index", "mask"}; `mask` is
    False where the entry only pads a split to a whole number of batches (None: nowhere).
    """

    def __init__(
        self,
        source: Sequence[dict],
        indices: Sequence[int],
        mask: np.ndarray | None,
        task: str,
        multi_label: bool,
    ):
        self.source, self.indices, self.mask = source, indices, mask
        self.task, self.multi_label = task, multi_label

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        example = self.source[index]
        label = example[self.task]
        return {
            "frames": example["frames"],
            "label": np.asarray(label, np.float32 if self.multi_label else np.int32),
            "index": np.int32(index),
            "mask": np.bool_(True if self.mask is None else self.mask[i]),
        }


def segment_indices(
    num_stored: int, num_frames: int, *, rng: np.random.Generator | None = None, offset=0.5
) -> np.ndarray:
    """Segment-based sampling of L of F stored frames.

    Splits [0, F) into L equal segments and takes one frame from each: a uniformly random
    one with `rng`, else the one at fraction `offset` of the segment (0.5: the middle).

    Returns:
        int [L] frame indices, non-decreasing.
    """
    edges = np.linspace(0, num_stored, num_frames + 1)
    widths = edges[1:] - edges[:-1]
    fraction = rng.random(num_frames) if rng is not None else np.full(num_frames, offset)
    return np.minimum((edges[:-1] + fraction * widths).astype(np.int64), num_stored - 1)


def take_frames(stored: np.ndarray | list[bytes], indices: np.ndarray) -> np.ndarray:
    """Frames `indices` of a stored video (uint8 array or JPEG list): uint8 [L, H, W, 3]."""
    if isinstance(stored, np.ndarray) and stored.dtype == np.uint8:
        return stored[indices]
    return np.stack([video.decode_jpeg(stored[i]) for i in indices])


def random_resized_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """An Inception-style crop box (top, left, h, w): random area share and aspect ratio.

    Falls back to the largest centred square after ten rejected draws.
    """
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_offsets(length: int, size: int, num_crops: int) -> list[int]:
    """Offsets of `num_crops` crops of `size` along an axis: centre, or spread end to end."""
    if num_crops == 1:
        return [(length - size) // 2]
    return [round(i * (length - size) / (num_crops - 1)) for i in range(num_crops)]


class TrainTransform(grain.transforms.RandomMap):
    """Training view: random segment sampling, random resized crop, random flip.

    One crop box and one flip for all L frames of a clip. Output `video` uint8
    [L, S, S, 3] replaces `frames`.
    """

    def __init__(
        self,
        num_frames: int,
        crop_size: int,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ):
        self.num_frames, self.crop_size = num_frames, crop_size
        self.scale, self.ratio, self.flip = scale, ratio, flip

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        element = dict(element)
        stored = element.pop("frames")
        frames = take_frames(stored, segment_indices(len(stored), self.num_frames, rng=rng))
        top, left, h, w = random_resized_box(*frames.shape[1:3], rng, self.scale, self.ratio)
        clip = video.resize(
            frames[:, top : top + h, left : left + w], self.crop_size, self.crop_size
        )  # [L, S, S, 3]
        if self.flip and rng.random() < 0.5:
            clip = clip[:, :, ::-1]
        element["video"] = np.ascontiguousarray(clip)
        return element


class EvalTransform(grain.transforms.Map):
    """Test views: middle frame of each segment, short side resized, centre crop.

    With `num_clips` x `num_crops` > 1 the views (clip-major) stack into `video` uint8
    [V, L, S, S, 3]; clip c takes fraction (c + 0.5) / num_clips of each segment and the
    crops spread along the long side. Else `video` is uint8 [L, S, S, 3].
    """

    def __init__(
        self,
        num_frames: int,
        crop_size: int,
        resize_to: int,
        num_clips: int = 1,
        num_crops: int = 1,
    ):
        if resize_to < crop_size:
            raise ValueError(f"resize_to={resize_to} is smaller than crop_size={crop_size}")
        self.num_frames, self.crop_size, self.resize_to = num_frames, crop_size, resize_to
        self.num_clips, self.num_crops = num_clips, num_crops

    def map(self, element: dict) -> dict:
        element = dict(element)
        stored = element.pop("frames")
        size = self.crop_size
        views = []
        for c in range(self.num_clips):
            offset = (c + 0.5) / self.num_clips
            frames = take_frames(
                stored, segment_indices(len(stored), self.num_frames, offset=offset)
            )
            h, w = video.resize_short_side(*frames.shape[1:3], self.resize_to)
            frames = video.resize(frames, h, w)  # [L, h, w, 3]
            tops = crop_offsets(h, size, self.num_crops if h > w else 1)
            lefts = crop_offsets(w, size, self.num_crops if w >= h else 1)
            for top in tops:
                for left in lefts:
                    views.append(frames[:, top : top + size, left : left + size])
        clips = np.stack(views)  # [V, L, S, S, 3]
        element["video"] = clips[0] if len(views) == 1 else clips
        return element
