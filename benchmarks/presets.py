"""Model shapes and batches the benchmarks run at: ``tiny``, ``small`` and ``base``.

Every preset is built in memory with random weights (no checkpoint is read), so the
benchmarks need no download; shapes, not values, set the cost of a step.

* ``tiny``: :meth:`CMDCLConfig.tiny` on 32 px frames, the CPU quickstart's model and batch
  (B=16, C=8 CausalKitchen activities, L=8).
* ``small``: every width 128 with 4 heads and 4x MLPs; CLIP vision and TimeSformer 4 layers
  on 64 px frames cut into 8 px patches, STA 2 layers, Q-Former 2 layers cross-attending
  at each; C=48 (Breakfast), L=8, B=4. 3,057,456 parameters (3,057,200 without
  ``video_norm``).
* ``base``: :meth:`CMDCLConfig.base` (CLIP ViT-B/16, TimeSformer-B, STA H=6, Q-Former 2 x
  512) at 8 frames of 224 px, C=48, B=2.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from cmdcl_jax.models.clip import ClipConfig, ClipTowerConfig
from cmdcl_jax.models.cmdcl import CMDCL, Architectures, CMDCLConfig
from cmdcl_jax.models.qformer import QFormerConfig
from cmdcl_jax.models.timesformer import TimesformerConfig
from cmdcl_jax.models.tiny_clip import tiny_clip_config


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model and the batch one training step sees: video uint8 [B, L, S, S, 3]."""

    name: str
    cfg: CMDCLConfig
    arch: Architectures
    num_classes: int
    batch_size: int

    @property
    def num_frames(self) -> int:
        return self.cfg.num_frames

    @property
    def frame_size(self) -> int:
        return self.arch.clip.vision.image_size

    def with_dtype(self, dtype: str) -> Preset:
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, dtype=dtype))

    def resized(self, num_frames: int = 0, batch_size: int = 0) -> Preset:
        """Another clip length L or batch B (0 keeps the preset's); the TimeSformer's time
        table and STA's positions are interpolated to L as in a run at that length."""
        cfg = self.cfg
        if num_frames:
            cfg = dataclasses.replace(cfg, num_frames=num_frames)
        return dataclasses.replace(self, cfg=cfg, batch_size=batch_size or self.batch_size)

    def build(self, seed: int = 0) -> CMDCL:
        """The model with random weights (``text_embeddings`` random unit vectors)."""
        return CMDCL(self.cfg, self.arch, self.num_classes, rngs=nnx.Rngs(seed))

    def batch(self, seed: int = 0) -> dict[str, np.ndarray]:
        """A random batch: ``video`` uint8 [B, L, S, S, 3], ``label`` int32 [B]."""
        rng = np.random.default_rng(seed)
        b, s = self.batch_size, self.frame_size
        return {
            "video": rng.integers(0, 256, (b, self.num_frames, s, s, 3), dtype=np.uint8),
            "label": rng.integers(0, self.num_classes, (b,), dtype=np.int32),
        }


def _tiny() -> Preset:
    cfg = CMDCLConfig.tiny(clip="")
    arch = Architectures(tiny_clip_config(vocab_size=64), cfg.timesformer_arch, cfg.qformer)
    return Preset("tiny", cfg, arch, num_classes=8, batch_size=16)


def _small() -> Preset:
    width, heads, layers, frames, size, patch = 128, 4, 4, 8, 64, 8
    tower = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    clip = ClipConfig(
        vision=ClipTowerConfig(**tower, image_size=size, patch_size=patch),
        text=ClipTowerConfig(**tower, vocab_size=64),
        projection_dim=width,
    )
    timesformer = TimesformerConfig(image_size=size, patch_size=patch, num_frames=frames, **tower)
    qformer = QFormerConfig(
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        cross_attention_frequency=1,
        encoder_hidden_size=width,
    )
    cfg = CMDCLConfig(
        clip="",
        timesformer_arch=timesformer,
        qformer=qformer,
        num_frames=frames,
        sta_layers=2,
        sta_heads=heads,
    )
    return Preset("small", cfg, Architectures(clip, timesformer, qformer), 48, batch_size=4)


def _base() -> Preset:
    cfg = CMDCLConfig.base(timesformer="", timesformer_arch=TimesformerConfig.base(), num_frames=8)
    clip = ClipConfig(
        vision=ClipTowerConfig(768, 3072, 12, 12, image_size=224, patch_size=16),
        text=ClipTowerConfig(512, 2048, 12, 8),
        projection_dim=512,
    )
    return Preset("base", cfg, Architectures(clip, cfg.timesformer_arch, cfg.qformer), 48, 2)


PRESETS = {"tiny": _tiny, "small": _small, "base": _base}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} not one of {sorted(PRESETS)}")
    return PRESETS[name]()
