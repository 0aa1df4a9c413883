"""BLIP-2 Q-Former, parameter-compatible with Hugging Face ``Blip2QFormerModel`` driven by
``query_embeds`` alone (no text input).

In CMDCL (``docs/model.md``, classifier) the C class queries ``T'`` self-attend, cross-attend to
the video tokens ``V'`` and pass an MLP. Only the query path is ported: the text-branch
weights of a checkpoint (``intermediate``/``output``) are left unread.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cmdcl_jax.models import hf_weights
from cmdcl_jax.models.layers import Attention, Mlp, layer_norm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Hyper-parameters of the Q-Former; the defaults are BLIP-2's (BERT-base width, ViT-g
    context of width 1408).

    Layer ``i`` cross-attends to the context when ``i % cross_attention_frequency == 0``.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408

    @classmethod
    def tiny(cls) -> QFormerConfig:
        """A two-layer model for CPU tests; only layer 0 cross-attends."""
        return cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
        )

    @classmethod
    def from_hf(cls, config: dict, *, source: str = "config.json") -> QFormerConfig:
        """Builds the config from a ``Blip2QFormerConfig`` dict or a full BLIP-2
        (``model_type`` "blip-2") config dict, whose ``qformer_config`` is read.

        Raises:
          ValueError: neither kind of config, or cross-attention without a context width;
            the message names ``source``.
        """
        kind = config.get("model_type")
        if kind == "blip-2":
            qformer = dict(config.get("qformer_config") or {})
            # Blip2Config derives the context width from the vision tower.
            vision_width = (config.get("vision_config") or {}).get("hidden_size")
            if "encoder_hidden_size" not in qformer and vision_width is not None:
                qformer["encoder_hidden_size"] = vision_width
        elif kind == "blip_2_qformer":
            qformer = config
        else:
            raise ValueError(
                f"{source}: model_type {kind!r} is not a Q-Former; expected 'blip_2_qformer' "
                "or 'blip-2'"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in qformer.items() if k in names})


class QFormerLayer(nnx.Module):
    """Post-LayerNorm block: self-attention, optional cross-attention, feed-forward.

    Each sub-block is ``norm(x + sublayer(x))``, as in BERT.
    """

    def __init__(
        self,
        cfg: QFormerConfig,
        *,
        cross_attention: bool,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        d, heads, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_norm_eps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(d, heads, **kw)
        self.self_norm = layer_norm(d, eps=eps, **kw)
        if cross_attention:
            self.cross_attn = Attention(d, heads, kv_dim=cfg.encoder_hidden_size, **kw)
            self.cross_norm = layer_norm(d, eps=eps, **kw)
        else:
            self.cross_attn = self.cross_norm = None
        self.mlp = Mlp(d, cfg.intermediate_size, act=cfg.hidden_act, **kw)
        self.mlp_norm = layer_norm(d, eps=eps, **kw)

    def __call__(self, x: Array, context: Array, mask: Array | None) -> Array:
        """Queries x [B, Q, D], context [B, S, E], mask [B, 1, 1, S] or None -> [B, Q, D]."""
        x = self.self_norm(x + self.self_attn(x))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self.cross_attn(x, context, mask=mask))
        return self.mlp_norm(x + self.mlp(x))


class QFormer(nnx.Module):
    """Q-Former over learned queries: LayerNorm on the queries, then the layers.

    No dropout is ported (the model is used for fine-tuning with its dropout off, as the
    CMDCL recipe gives none), so ``deterministic`` changes nothing; it is there for the
    common module interface.

    Args:
      cfg: model shape.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness (N(0, 0.02) weights, zero biases, unit LayerNorm
        scales, as Hugging Face initialises).
    """

    def __init__(self, cfg: QFormerConfig, *, dtype=None, param_dtype=jnp.float32, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype
        self.input_norm = layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.layers = nnx.List(
            [
                QFormerLayer(cfg, cross_attention=i % cfg.cross_attention_frequency == 0, **kw)
                for i in range(cfg.num_hidden_layers)
            ]
        )

    def __call__(
        self,
        queries: Array,
        context: Array,
        *,
        context_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Runs the queries against a context.

        Args:
          queries: [B, Q, D] query embeddings (``query_embeds``).
          context: [B, S, E] states cross-attended to (``encoder_hidden_states``).
          context_mask: optional [B, S], True (or 1) for context positions to attend to.
          deterministic: unused (no dropout in this port).

        Returns:
          The last hidden state [B, Q, D].
        """
        del deterministic
        mask = None
        if context_mask is not None:
            mask = context_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
        x = self.input_norm(queries.astype(self.dtype or queries.dtype))  # [B, Q, D]
        context = context.astype(self.dtype or context.dtype)
        for layer in self.layers:
            x = layer(x, context, mask)
        return x

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, param_dtype=jnp.float32) -> QFormer:
        """Loads a ``Blip2QFormerModel`` checkpoint, or the Q-Former of a full BLIP-2
        checkpoint (config ``model_type`` "blip-2", tensors under ``qformer.``).

        Args:
          source: a ``save_pretrained`` directory or a Hugging Face hub id.

        Raises:
          WeightLoadError: missing files, another architecture, or tensors that do not fit;
            the message names the file and parameter.
        """
        directory = hf_weights.resolve(source)
        config = hf_weights.read_config(directory, ["blip_2_qformer", "blip-2"])
        cfg = QFormerConfig.from_hf(config, source=str(directory / "config.json"))
        prefix = "qformer." if config["model_type"] == "blip-2" else ""
        return hf_weights.load_module(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
            hf_weights.read_tensors(directory),
            rules(prefix),
            source=str(source),
        )


def rules(prefix: str = "") -> list[hf_weights.Rule]:
    """The Hugging Face key -> parameter table; ``prefix`` is ``"qformer."`` for a full
    BLIP-2 checkpoint. Keys of the text branch (``intermediate``, ``output``) match nothing."""
    p = prefix.replace(".", r"\.")
    layer, mine = rf"{p}encoder\.layer\.(\d+)", r"layers.\1"
    out = [
        *hf_weights.norm_rules(rf"{p}layernorm", "input_norm"),
        *hf_weights.dense_rules(rf"{layer}\.intermediate_query\.dense", f"{mine}.mlp.fc1"),
        *hf_weights.dense_rules(rf"{layer}\.output_query\.dense", f"{mine}.mlp.fc2"),
        *hf_weights.norm_rules(rf"{layer}\.output_query\.LayerNorm", f"{mine}.mlp_norm"),
    ]
    for hf_name, our_name in [("attention", "self"), ("crossattention", "cross")]:
        block, attn = rf"{layer}\.{hf_name}", f"{mine}.{our_name}_attn"
        for projection in ("query", "key", "value"):
            out += hf_weights.dense_rules(
                rf"{block}\.attention\.{projection}", f"{attn}.{projection}"
            )
        out += hf_weights.dense_rules(rf"{block}\.output\.dense", f"{attn}.out")
        out += hf_weights.norm_rules(rf"{block}\.output\.LayerNorm", f"{mine}.{our_name}_norm")
    return out
