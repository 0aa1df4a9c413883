"""CLIP vision and text towers, parameter-compatible with Hugging Face ``CLIPModel``.

``Clip.from_pretrained(source)`` reads a ``save_pretrained`` directory (or a hub id) with
no PyTorch; ``save_pretrained`` writes the same format back (used to make the tiny CLIP
of the CPU demo). In CMDCL the whole model is frozen: the text tower runs once to give the
class embeddings ``T0`` and the vision tower gives the per-frame embeddings ``V_P``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cmdcl_jax.models import hf_weights
from cmdcl_jax.models.layers import PreNormBlock, layer_norm

Array = jax.Array

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipTowerConfig:
    """One transformer tower. ``image_size``/``patch_size`` apply to the vision tower,
    ``vocab_size``/``max_position_embeddings``/``eos_token_id`` to the text tower."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1

    @classmethod
    def from_hf(cls, d: dict) -> ClipTowerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    vision: ClipTowerConfig
    text: ClipTowerConfig
    projection_dim: int = 512
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD

    @classmethod
    def from_hf(cls, config: dict, preprocessor: dict | None = None) -> ClipConfig:
        pre = preprocessor or {}
        return cls(
            vision=ClipTowerConfig.from_hf(config["vision_config"]),
            text=ClipTowerConfig.from_hf(config["text_config"]),
            projection_dim=config.get("projection_dim", 512),
            image_mean=tuple(pre.get("image_mean", OPENAI_MEAN)),
            image_std=tuple(pre.get("image_std", OPENAI_STD)),
        )

    @classmethod
    def read(cls, directory: Path) -> ClipConfig:
        """The config of a ``CLIPModel`` checkpoint directory (model_type checked)."""
        return cls.from_hf(
            hf_weights.read_config(directory, ["clip"]), hf_weights.read_preprocessor(directory)
        )

    def to_hf(self) -> dict:
        text = dataclasses.asdict(self.text)
        vision = dataclasses.asdict(self.vision)
        for key in (
            "vocab_size",
            "max_position_embeddings",
            "eos_token_id",
            "bos_token_id",
            "pad_token_id",
        ):
            vision.pop(key)
        for key in ("image_size", "patch_size", "num_channels"):
            text.pop(key)
        text["projection_dim"] = vision["projection_dim"] = self.projection_dim
        return {
            "model_type": "clip",
            "architectures": ["CLIPModel"],
            "projection_dim": self.projection_dim,
            "text_config": text,
            "vision_config": vision,
        }


def _block(cfg: ClipTowerConfig, **kw) -> PreNormBlock:
    return PreNormBlock(
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        act=cfg.hidden_act,
        eps=cfg.layer_norm_eps,
        **kw,
    )


class ClipVision(nnx.Module):
    """Vision tower plus ``visual_projection``: frames -> joint-space embeddings."""

    def __init__(self, cfg: ClipConfig, *, dtype=None, param_dtype=jnp.float32, rngs):
        v = cfg.vision
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.image_size, self.patch_size = v.image_size, v.patch_size
        self.image_mean, self.image_std = cfg.image_mean, cfg.image_std
        self.patch_embedding = nnx.Conv(
            v.num_channels,
            v.hidden_size,
            kernel_size=(v.patch_size, v.patch_size),
            strides=(v.patch_size, v.patch_size),
            padding="VALID",
            use_bias=False,
            kernel_init=init,
            **kw,
        )
        num_positions = (v.image_size // v.patch_size) ** 2 + 1
        self.class_embedding = nnx.Param(init(rngs.params(), (v.hidden_size,), param_dtype))
        self.position_embedding = nnx.Param(
            init(rngs.params(), (num_positions, v.hidden_size), param_dtype)
        )
        self.pre_layrnorm = layer_norm(v.hidden_size, eps=v.layer_norm_eps, **kw)
        self.layers = nnx.List([_block(v, **kw) for _ in range(v.num_hidden_layers)])
        self.post_layernorm = layer_norm(v.hidden_size, eps=v.layer_norm_eps, **kw)
        self.projection = nnx.Linear(
            v.hidden_size, cfg.projection_dim, use_bias=False, kernel_init=init, **kw
        )
        self.dtype = dtype

    def normalize(self, images: Array) -> Array:
        """uint8 [..., H, W, 3] -> float32 normalised with the checkpoint's mean and std."""
        mean = jnp.asarray(self.image_mean, jnp.float32)
        std = jnp.asarray(self.image_std, jnp.float32)
        return (images.astype(jnp.float32) / 255.0 - mean) / std

    def __call__(self, pixels: Array) -> Array:
        """Normalised float [N, H, W, 3] -> projected class-token embeddings [N, P]."""
        n, h, w, _ = pixels.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"CLIP vision tower expects {self.image_size}x{self.image_size} frames, got {h}x{w}"
            )
        x = self.patch_embedding(pixels.astype(self.dtype or pixels.dtype))  # [N, h, w, D]
        x = x.reshape(n, -1, x.shape[-1])  # [N, hw, D]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]  # [N, 1+hw, D]
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        return self.projection(self.post_layernorm(x[:, 0]))  # [N, P]


class ClipText(nnx.Module):
    """Text tower plus ``text_projection``: token ids -> joint-space embeddings."""

    def __init__(self, cfg: ClipConfig, *, dtype=None, param_dtype=jnp.float32, rngs):
        t = cfg.text
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.eos_token_id = t.eos_token_id
        self.token_embedding = nnx.Embed(t.vocab_size, t.hidden_size, embedding_init=init, **kw)
        self.position_embedding = nnx.Param(
            init(rngs.params(), (t.max_position_embeddings, t.hidden_size), param_dtype)
        )
        self.layers = nnx.List([_block(t, **kw) for _ in range(t.num_hidden_layers)])
        self.final_layer_norm = layer_norm(t.hidden_size, eps=t.layer_norm_eps, **kw)
        self.projection = nnx.Linear(
            t.hidden_size, cfg.projection_dim, use_bias=False, kernel_init=init, **kw
        )

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Token ids [C, S] (and optional padding mask [C, S]) -> embeddings [C, P].

        Causal self-attention; pooled at the first ``eos_token_id`` (at the largest id for
        configs with the legacy ``eos_token_id == 2``, as ``transformers`` does).

        Raises:
          ValueError: S is longer than the position table (``max_position_embeddings``).
        """
        s = input_ids.shape[1]
        limit = self.position_embedding.shape[0]
        if s > limit:
            raise ValueError(
                f"CLIP text of {s} tokens is longer than the model's "
                f"max_position_embeddings={limit}; truncate it to {limit} tokens"
            )
        x = self.token_embedding(input_ids) + self.position_embedding[:s]  # [C, S, D]
        mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
        for layer in self.layers:
            x = layer(x, is_causal=True, mask=mask)
        x = self.final_layer_norm(x)
        if self.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)  # [C]
        else:
            eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # [C]
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]  # [C, D]
        return self.projection(pooled)  # [C, P]


def _tower_rules(hf: str, ours: str) -> list[hf_weights.Rule]:
    layer = rf"{hf}\.encoder\.layers\.(\d+)"
    mine = rf"{ours}.layers.\1"
    rules = []
    for hf_name, our_name in [
        ("q_proj", "query"),
        ("k_proj", "key"),
        ("v_proj", "value"),
        ("out_proj", "out"),
    ]:
        rules += hf_weights.dense_rules(
            rf"{layer}\.self_attn\.{hf_name}", f"{mine}.self_attn.{our_name}"
        )
    for fc in ("fc1", "fc2"):
        rules += hf_weights.dense_rules(rf"{layer}\.mlp\.{fc}", f"{mine}.mlp.{fc}")
    for ln in ("layer_norm1", "layer_norm2"):
        rules += hf_weights.norm_rules(rf"{layer}\.{ln}", f"{mine}.{ln}")
    return rules


RULES: list[hf_weights.Rule] = [
    (
        r"vision_model\.embeddings\.patch_embedding\.weight",
        "vision.patch_embedding.kernel",
        hf_weights.conv2d,
    ),
    (r"vision_model\.embeddings\.class_embedding", "vision.class_embedding", hf_weights.identity),
    (
        r"vision_model\.embeddings\.position_embedding\.weight",
        "vision.position_embedding",
        hf_weights.identity,
    ),
    *hf_weights.norm_rules(r"vision_model\.pre_layrnorm", "vision.pre_layrnorm"),
    *_tower_rules("vision_model", "vision"),
    *hf_weights.norm_rules(r"vision_model\.post_layernorm", "vision.post_layernorm"),
    (r"visual_projection\.weight", "vision.projection.kernel", hf_weights.linear),
    (
        r"text_model\.embeddings\.token_embedding\.weight",
        "text.token_embedding.embedding",
        hf_weights.identity,
    ),
    (
        r"text_model\.embeddings\.position_embedding\.weight",
        "text.position_embedding",
        hf_weights.identity,
    ),
    *_tower_rules("text_model", "text"),
    *hf_weights.norm_rules(r"text_model\.final_layer_norm", "text.final_layer_norm"),
    (r"text_projection\.weight", "text.projection.kernel", hf_weights.linear),
]


class Clip(nnx.Module):
    """CLIP: ``vision`` (:class:`ClipVision`) and ``text`` (:class:`ClipText`)."""

    def __init__(self, cfg: ClipConfig, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.cfg = cfg
        self.vision = ClipVision(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text = ClipText(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @classmethod
    def from_pretrained(
        cls, source, *, dtype=None, param_dtype=jnp.float32, place: hf_weights.Place | None = None
    ) -> Clip:
        """Loads a ``CLIPModel`` checkpoint (a ``save_pretrained`` directory or a hub id)
        tensor by tensor, each parameter onto ``place(shape)`` when given."""
        directory = hf_weights.resolve(source)
        cfg = ClipConfig.read(directory)
        return hf_weights.load_module(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
            hf_weights.read_tensors(directory),
            RULES,
            source=str(source),
            place=place,
        )

    def save_pretrained(self, directory, *, logit_scale: float = float(np.log(1 / 0.07))) -> None:
        """Writes config.json, preprocessor_config.json and model.safetensors;
        ``logit_scale`` (log of the contrastive loss's scale) is kept for the record."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.cfg.to_hf(), indent=2))
        pre = {
            "image_processor_type": "CLIPImageProcessor",
            "image_mean": list(self.cfg.image_mean),
            "image_std": list(self.cfg.image_std),
            "size": {"shortest_edge": self.cfg.vision.image_size},
            "crop_size": {
                "height": self.cfg.vision.image_size,
                "width": self.cfg.vision.image_size,
            },
        }
        (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        tensors = hf_weights.export_params(self, RULES)
        tensors["logit_scale"] = np.asarray(logit_scale, np.float32)  # unused by CMDCL
        save_file(
            {k: np.require(v, requirements="C") for k, v in tensors.items()},
            str(directory / "model.safetensors"),
            metadata={"format": "pt"},
        )
