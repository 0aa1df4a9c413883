"""TimeSformer video encoder (divided space-time attention), parameter-compatible with
Hugging Face ``TimesformerModel``.

CMDCL's visual causal intervention encodes the sampled frames with this model and averages
its patch tokens per frame (``docs/model.md``, VCI). ``Timesformer.from_pretrained`` reads a
``save_pretrained`` directory (or a hub id) of ``TimesformerModel`` or
``TimesformerForVideoClassification`` (its classifier is ignored) without PyTorch.

Tokens stay structured as ``[B, T, N, D]`` (frames, patches per frame) with the class
token apart as ``[B, D]``, instead of Hugging Face's flat ``[B, 1 + N*T, D]`` sequence
(class token first, then patches in (patch, frame) order); the arithmetic is the same.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from cmdcl_jax.models import hf_weights
from cmdcl_jax.models.layers import Mlp, check_attention, dense, layer_norm, multi_head_attention

Array = jax.Array

# facebook/timesformer-base-finetuned-k400's preprocessor_config.json (VideoMAE processor).
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


@dataclasses.dataclass(frozen=True)
class TimesformerConfig:
    """Hyper-parameters of a TimeSformer; the defaults are TimeSformer-B (K400, 8 frames).

    ``num_frames`` and ``image_size`` are those the checkpoint was trained at: its time and
    position embedding tables have that many rows. Other frame counts and frame sizes are
    accepted at call time by interpolating the tables (see :class:`Timesformer`).
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_frames: int = 8
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    image_mean: tuple[float, float, float] = KINETICS_MEAN
    image_std: tuple[float, float, float] = KINETICS_STD

    @property
    def grid(self) -> int:
        """Patches along each side of a frame of ``image_size``."""
        return self.image_size // self.patch_size

    @classmethod
    def base(cls) -> TimesformerConfig:
        """TimeSformer-B, the shape of facebook/timesformer-base-finetuned-k400."""
        return cls()

    @classmethod
    def tiny(cls) -> TimesformerConfig:
        """A few-thousand-parameter model for CPU tests: 32px frames, 4x4 patches of 8px."""
        return cls(
            image_size=32,
            patch_size=8,
            num_frames=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )

    @classmethod
    def from_hf(
        cls, config: dict, preprocessor: dict | None = None, *, source: str = "config.json"
    ) -> TimesformerConfig:
        """Builds the config from a ``TimesformerConfig`` dict and, when given, the
        processor's ``preprocessor_config.json`` dict (``image_mean``/``image_std``).

        Raises:
          ValueError: the checkpoint uses an attention type other than divided space-time,
            or non-square frames/patches; the message names ``source``.
        """
        attention = config.get("attention_type", "divided_space_time")
        if attention != "divided_space_time":
            raise ValueError(
                f"{source}: attention_type {attention!r} is not supported; this port "
                "implements 'divided_space_time' only"
            )
        for key in ("image_size", "patch_size"):
            if key in config and not isinstance(config[key], int):
                raise ValueError(f"{source}: {key} {config[key]!r} must be one int (square)")
        names = {f.name for f in dataclasses.fields(cls)} - {"image_mean", "image_std"}
        kwargs = {k: v for k, v in config.items() if k in names}
        for key in ("image_mean", "image_std"):
            if preprocessor and key in preprocessor:
                kwargs[key] = tuple(float(v) for v in preprocessor[key])
        return cls(**kwargs)

    @classmethod
    def read(cls, directory: Path) -> TimesformerConfig:
        """The config of a TimeSformer checkpoint directory.

        Raises:
          WeightLoadError: another architecture or an unsupported one, naming config.json.
        """
        config = hf_weights.read_config(directory, ["timesformer"])
        try:
            return cls.from_hf(
                config,
                hf_weights.read_preprocessor(directory),
                source=str(directory / "config.json"),
            )
        except ValueError as err:
            raise hf_weights.WeightLoadError(str(err)) from err


class FusedAttention(nnx.Module):
    """Self-attention with one fused ``qkv`` projection (TimeSformer's layout).

    The ``qkv`` output is ``[q | k | v]`` along the last axis, each ``[heads, head_dim]``,
    as in the PyTorch ``qkv`` weight. ``attention`` picks the implementation
    (``layers.ATTENTION_IMPLEMENTATIONS``).
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool, attention: str, dtype, param_dtype, rngs
    ):
        self.num_heads = num_heads
        self.attention = attention
        self.qkv = dense(
            dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.out = dense(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """[..., S, D] -> [..., S, D]: every token attends to the S tokens of its group."""
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)  # 3 x [..., S, D]
        out = multi_head_attention(q, k, v, self.num_heads, implementation=self.attention)
        return self.out(out)


class TimesformerBlock(nnx.Module):
    """One divided space-time block: temporal attention, spatial attention, MLP.

    Temporal attention runs over the T frames of each patch position; its output passes
    ``temporal_dense`` before the residual. Spatial attention runs over the class token and
    the N patches of each frame, with the class token copied into every frame and its T
    outputs averaged. The MLP is pre-LayerNorm with a residual, on every token.
    """

    def __init__(
        self,
        cfg: TimesformerConfig,
        *,
        attention: str = "auto",
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn = dict(qkv_bias=cfg.qkv_bias, attention=attention, **kw)
        heads = cfg.num_attention_heads
        self.temporal_norm = layer_norm(d, eps=cfg.layer_norm_eps, **kw)
        self.temporal_attn = FusedAttention(d, heads, **attn)
        self.temporal_dense = dense(d, d, **kw)
        self.spatial_norm = layer_norm(d, eps=cfg.layer_norm_eps, **kw)
        self.spatial_attn = FusedAttention(d, heads, **attn)
        self.mlp_norm = layer_norm(d, eps=cfg.layer_norm_eps, **kw)
        self.mlp = Mlp(d, cfg.intermediate_size, act=cfg.hidden_act, **kw)

    def __call__(self, x: Array, cls: Array) -> tuple[Array, Array]:
        """Patch tokens x [B, T, N, D] and class token cls [B, D] -> the same shapes."""
        b, t, n, d = x.shape
        xt = jnp.swapaxes(x, 1, 2)  # [B, N, T, D]
        temporal = self.temporal_attn(self.temporal_norm(xt))  # [B, N, T, D]
        x = x + self.temporal_dense(jnp.swapaxes(temporal, 1, 2))  # [B, T, N, D]

        cls_per_frame = jnp.broadcast_to(cls[:, None, None, :], (b, t, 1, d))  # [B, T, 1, D]
        frames = jnp.concatenate([cls_per_frame, x], axis=2)  # [B, T, 1+N, D]
        spatial = self.spatial_attn(self.spatial_norm(frames))  # [B, T, 1+N, D]
        cls = cls + jnp.mean(spatial[:, :, 0], axis=1)  # [B, D]
        x = x + spatial[:, :, 1:]  # [B, T, N, D]

        x = x + self.mlp(self.mlp_norm(x))
        cls = cls + self.mlp(self.mlp_norm(cls))
        return x, cls


def _run_block(block: TimesformerBlock, x: Array, cls: Array) -> tuple[Array, Array]:
    return block(x, cls)


_run_block_remat = nnx.remat(_run_block)


class Timesformer(nnx.Module):
    """TimeSformer encoder: normalised frames -> patch tokens and class token.

    Frame count: T comes from the input. When it differs from ``cfg.num_frames`` the time
    embeddings are resized by linear interpolation over time (``jax.image.resize``,
    half-pixel centres, no antialiasing); Hugging Face uses nearest-neighbour here.
    Frame size: the frame is cut into a grid of H // p by W // p patches (p =
    ``patch_size``); rows and columns past the last whole patch are dropped, as Hugging
    Face's strided patch convolution does. When the grid differs from the checkpoint's,
    the spatial position embeddings are resized bilinearly (same rule; Hugging Face uses
    nearest). The class token's position embedding is kept.

    No dropout or stochastic depth is ported (the released checkpoints use none at
    fine-tuning time), so ``deterministic`` changes nothing; it is there for the common
    module interface.

    Args:
      cfg: model shape.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
      param_dtype: storage dtype of the parameters.
      remat: rematerialise each block in the backward pass (``nnx.remat``), trading
        compute for activation memory.
      attention: how attention is computed, one of ``layers.ATTENTION_IMPLEMENTATIONS``
        ("auto": cuDNN's fused kernel on an NVIDIA GPU in bfloat16, XLA's otherwise).
      rngs: initialisation randomness (N(0, 0.02) weights, as Hugging Face initialises).
    """

    def __init__(
        self,
        cfg: TimesformerConfig,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        remat: bool = False,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.patch_embed = nnx.Conv(
            cfg.num_channels,
            d,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            kernel_init=init,
            **kw,
        )
        # Hugging Face's shapes, so the tables load and export unchanged.
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + cfg.grid**2, d), param_dtype))
        self.time_embed = nnx.Param(init(rngs.params(), (1, cfg.num_frames, d), param_dtype))
        check_attention(attention)
        self.layers = nnx.List(
            [TimesformerBlock(cfg, attention=attention, **kw) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = layer_norm(d, eps=cfg.layer_norm_eps, **kw)

    def normalize(self, video: Array) -> Array:
        """uint8 [..., H, W, 3] -> float normalised with ``cfg.image_mean``/``image_std``.

        The result has the compute dtype (float32 when ``dtype`` is None).
        """
        mean = jnp.asarray(self.cfg.image_mean, jnp.float32)
        std = jnp.asarray(self.cfg.image_std, jnp.float32)
        out = (video.astype(jnp.float32) / 255.0 - mean) / std
        return out.astype(self.dtype or jnp.float32)

    def __call__(self, pixels: Array, *, deterministic: bool = True) -> tuple[Array, Array]:
        """Encodes a batch of clips.

        Args:
          pixels: normalised float frames [B, T, H, W, C], channels last.
          deterministic: unused (no dropout in this port).

        Returns:
          ``(tokens, cls)`` after the final LayerNorm: patch tokens [B, T, N, D] with
          N = (H // p) * (W // p) in row-major patch order, and the class token [B, D].

        Raises:
          ValueError: a frame smaller than one patch.
        """
        del deterministic
        b, t, h, w, c = pixels.shape
        p = self.cfg.patch_size
        if h < p or w < p:
            raise ValueError(f"frame size {h}x{w} is smaller than the patch size {p}")
        x = pixels.reshape(b * t, h, w, c).astype(self.dtype or pixels.dtype)  # [B*T, H, W, C]
        x = self.patch_embed(x)  # [B*T, H // p, W // p, D]: VALID, the remainder dropped
        d = x.shape[-1]
        x = x.reshape(b, t, -1, d)  # [B, T, N, D]
        pos = self.pos_embed[...][0].astype(x.dtype)  # [1+N0, D]
        x = x + self._patch_positions(pos[1:], h // p, w // p)[None, None]  # [B, T, N, D]
        x = x + self._frame_times(t).astype(x.dtype)[None, :, None]  # [B, T, N, D]
        cls_token = self.cls_token[...][0, 0].astype(x.dtype) + pos[0]  # [D]
        cls = jnp.broadcast_to(cls_token, (b, d))  # [B, D]

        run = _run_block_remat if self.remat else _run_block
        for block in self.layers:
            x, cls = run(block, x, cls)
        return self.norm(x), self.norm(cls)

    def _patch_positions(self, table: Array, gh: int, gw: int) -> Array:
        """The [N0, D] patch position table for a gh x gw grid: [gh*gw, D]."""
        g = self.cfg.grid
        if (gh, gw) == (g, g):
            return table
        grid = table.reshape(g, g, -1)  # [g, g, D]
        grid = jax.image.resize(grid, (gh, gw, grid.shape[-1]), "bilinear", antialias=False)
        return grid.reshape(gh * gw, -1)  # [gh*gw, D]

    def _frame_times(self, t: int) -> Array:
        """The time embedding table for t frames: [t, D]."""
        table = self.time_embed[...][0]  # [T0, D]
        if t == table.shape[0]:
            return table
        return jax.image.resize(table, (t, table.shape[-1]), "linear", antialias=False)

    @classmethod
    def from_pretrained(
        cls,
        source,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        remat: bool = False,
        attention: str = "auto",
    ) -> Timesformer:
        """Loads a ``TimesformerModel`` or ``TimesformerForVideoClassification`` checkpoint.

        Args:
          source: a ``save_pretrained`` directory or a Hugging Face hub id. Its
            ``preprocessor_config.json``, when present, gives ``image_mean``/``image_std``.

        Raises:
          WeightLoadError: missing files, another architecture, an unsupported attention
            type, or tensors that do not fit; the message names the file and parameter.
        """
        directory = hf_weights.resolve(source)
        cfg = TimesformerConfig.read(directory)
        tensors = hf_weights.read_tensors(directory)
        prefix = "timesformer." if any(k.startswith("timesformer.") for k in tensors) else ""
        return hf_weights.load_module(
            lambda: cls(
                cfg,
                dtype=dtype,
                param_dtype=param_dtype,
                remat=remat,
                attention=attention,
                rngs=nnx.Rngs(0),
            ),
            tensors,
            rules(prefix),
            source=str(source),
        )


def rules(prefix: str = "") -> list[hf_weights.Rule]:
    """The Hugging Face key -> parameter table; ``prefix`` is ``"timesformer."`` for a
    ``TimesformerForVideoClassification`` checkpoint (whose ``classifier`` stays unread)."""
    p = prefix.replace(".", r"\.")
    layer, mine = rf"{p}encoder\.layer\.(\d+)", r"layers.\1"
    emb = rf"{p}embeddings"
    out = [
        (rf"{emb}\.cls_token", "cls_token", hf_weights.identity),
        (rf"{emb}\.position_embeddings", "pos_embed", hf_weights.identity),
        (rf"{emb}\.time_embeddings", "time_embed", hf_weights.identity),
        (rf"{emb}\.patch_embeddings\.projection\.weight", "patch_embed.kernel", hf_weights.conv2d),
        (rf"{emb}\.patch_embeddings\.projection\.bias", "patch_embed.bias", hf_weights.identity),
        *hf_weights.norm_rules(rf"{p}layernorm", "norm"),
        *hf_weights.norm_rules(rf"{layer}\.temporal_layernorm", f"{mine}.temporal_norm"),
        *hf_weights.norm_rules(rf"{layer}\.layernorm_before", f"{mine}.spatial_norm"),
        *hf_weights.norm_rules(rf"{layer}\.layernorm_after", f"{mine}.mlp_norm"),
        *hf_weights.dense_rules(rf"{layer}\.temporal_dense", f"{mine}.temporal_dense"),
        *hf_weights.dense_rules(rf"{layer}\.intermediate\.dense", f"{mine}.mlp.fc1"),
        *hf_weights.dense_rules(rf"{layer}\.output\.dense", f"{mine}.mlp.fc2"),
    ]
    for hf_name, our_name in [
        ("temporal_attention", "temporal_attn"),
        ("attention", "spatial_attn"),
    ]:
        out += hf_weights.dense_rules(
            rf"{layer}\.{hf_name}\.attention\.qkv", f"{mine}.{our_name}.qkv"
        )
        out += hf_weights.dense_rules(
            rf"{layer}\.{hf_name}\.output\.dense", f"{mine}.{our_name}.out"
        )
    return out
