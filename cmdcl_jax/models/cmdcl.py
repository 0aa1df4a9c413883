"""CMDCL: frozen CLIP + TCI + TimeSformer/STA + VCI + Q-Former classifier.

The composed model of ``docs/model.md``. Notation: B batch, L frames, C classes,
D the CLIP joint width, Dv the TimeSformer width.

Choices beyond the paper, each a field of :class:`CMDCLConfig`:

* ``h`` and ``g`` are ``LayerNorm(skip + MLP([anchor; evidence]))`` (``interventions``):
  ``h``'s skip is its anchor ``T``; ``g``'s (``g_residual``) is its evidence ``Vhat``.
  Measured (``benchmarks/vci_diagnostics.py``, tiny model at initialisation): with the
  skip on ``T'`` ("anchor") g's MLP branch has norm 0.06 against ``|T'|`` 5.7, so ``V'``
  is 0.03 % video and 99.97 % class, the logits' spread across videos is 1e-5, the
  video path's gradient 1e-4 of the head's, and the VCI variants never leave ln C; with
  the skip on ``Vhat`` ``V'`` is 97 % video and the video path's gradient 200x larger.
* ``T'`` leaves TCI (or ``T`` when TCI is off) at one norm, ``text_scale``: "rms" (unit
  RMS per channel, norm sqrt(D), the scale of ``VH`` it multiplies in the fine-grained
  scores) or "unit" (CLIP's sphere). Without it ``T'`` had norm 1 without TCI and
  sqrt(D) with it, so switching TCI also changed VCI's effective temperature sqrt(D)-fold.
* The video tokens are TimeSformer patch tokens averaged per frame, then ``Linear(Dv, D)``.
* With ``vci=False`` the Q-Former cross-attends to those L frame tokens; with ``vci=True``
  to the C class-wise deconfounded tokens ``V'``.
* Temperatures ``tau_t``/``tau_v`` default to 0.07, fixed unless ``learn_temperature``.
* Fine-grained scores are computed ``class_chunk`` classes at a time (bounded memory).
* The class-wise head is ``logit[b, c] = <W[c], F[b, c]> + bias[c]`` (Eq. 9), with
  dropout (rate ``dropout``) on ``F`` in training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cmdcl_jax.models import hf_weights
from cmdcl_jax.models.clip import Clip, ClipConfig, ClipVision
from cmdcl_jax.models.interventions import (
    STA,
    TCI_MODES,
    Approximator,
    ConfounderDictionary,
    ConfounderStatistic,
    bias_aware_scores,
    fine_grained_pool,
    fine_grained_scores,
)
from cmdcl_jax.models.layers import dense, layer_norm, normalize
from cmdcl_jax.models.qformer import QFormer, QFormerConfig
from cmdcl_jax.models.timesformer import Timesformer, TimesformerConfig

Array = jax.Array

# Norm of T' [B, C, D] as a function of D: "unit" is CLIP's sphere, "rms" unit RMS per
# channel (norm sqrt(D)), the scale of the LayerNorm outputs VH it multiplies in SF.
TEXT_SCALES = {"unit": lambda d: 1.0, "rms": math.sqrt}

# Trainable parameters: everything but the frozen CLIP (which gets no optimizer state).
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("clip")))
# State estimated from the data in the train step (TCI's confounder dictionary).
CONFOUNDERS = ConfounderStatistic
# Std of weight matrices and embedding tables at initialisation in BERT, ViT and BLIP-2.
BERT_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class CMDCLConfig:
    """Model hyper-parameters. Presets: :meth:`base` (paper scale) and :meth:`tiny` (CPU).

    Attributes:
      clip: CLIP checkpoint, a Hugging Face id or a ``save_pretrained`` directory.
      timesformer: TimeSformer checkpoint; "" initialises ``timesformer_arch`` randomly.
      timesformer_arch: TimeSformer shape used when ``timesformer`` is "".
      qformer: Q-Former shape; its ``hidden_size`` and ``encoder_hidden_size`` must equal
        CLIP's ``projection_dim`` (D).
      qformer_source: Q-Former checkpoint; "" (default) initialises it randomly.
      num_frames: L the STA position table is sized for (interpolated at other L).
      sta_layers: STA depth H (paper Fig. 7a: 6). sta_heads: its attention heads.
      tci, vci: the two interventions (paper Table 3 variants).
      tci_mode: what TCI's bias term is. "sample": each video's own bias
        ``Bias = S @ V_P``, ``T'[b, c] = h(T[c], Bias[b, c])``. "dictionary": the
        back-door sum over a set of confounder values (Eq. 2) under the NWGM (Eq. 3),
        ``T'[c] = h(T[c], sum_k P(b_k) b_k[c])``, ``b_k`` [C, D] prototypes of the
        training videos' biases kept by online k-means in the train step
        (``interventions.ConfounderDictionary``).
      num_confounders: K, the dictionary's entries (at most the training batch).
      confounder_momentum: the dictionary's moving-average momentum per train step.
      tau_t, tau_v: temperatures of the bias-aware and fine-grained scores.
      learn_temperature: learn both temperatures in log space.
      g_residual: skip connection of VCI's approximator g: "evidence" (Vhat), "anchor"
        (T') or "none".
      text_scale: norm of T' entering VCI and the classifier: "rms" (sqrt(D)) or "unit".
      class_chunk: classes per step of the fine-grained scores (<= 0: all at once).
      prompt_template: text prompt per class, ``{}`` is the class name.
      dropout: dropout rate on the Q-Former output before the head (training only).
      init_std: std of the random weight matrices and embedding tables (BERT/ViT: 0.02).
      dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
      remat: rematerialise TimeSformer blocks in the backward pass.
      attention: how the TimeSformer computes attention (``layers.ATTENTION_IMPLEMENTATIONS``):
        "auto" (cuDNN's fused kernel on an NVIDIA GPU in bfloat16, XLA's otherwise),
        "xla", "cudnn" or "explicit" (written-out einsums, the reference).
    """

    clip: str
    timesformer: str = ""
    timesformer_arch: TimesformerConfig = TimesformerConfig()
    qformer: QFormerConfig = QFormerConfig()
    qformer_source: str = ""
    num_frames: int = 64
    sta_layers: int = 6
    sta_heads: int = 8
    tci: bool = True
    vci: bool = True
    tci_mode: str = "sample"
    num_confounders: int = 8
    confounder_momentum: float = 0.99
    tau_t: float = 0.07
    tau_v: float = 0.07
    learn_temperature: bool = False
    g_residual: str = "evidence"
    text_scale: str = "rms"
    video_norm: bool = True
    class_chunk: int = 64
    prompt_template: str = "a video of a person {}."
    dropout: float = 0.1
    init_std: float = BERT_INIT_STD
    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> CMDCLConfig:
        """Inverse of ``dataclasses.asdict`` (as stored in a run's ``run.json``)."""
        return cls(
            **{
                **d,
                "timesformer_arch": TimesformerConfig(
                    **{
                        k: tuple(v) if isinstance(v, list) else v
                        for k, v in d["timesformer_arch"].items()
                    }
                ),
                "qformer": QFormerConfig(**d["qformer"]),
            }
        )

    @classmethod
    def base(cls, **overrides) -> CMDCLConfig:
        """The paper's scale: CLIP ViT-B/16, TimeSformer-B/16 (K400) at 224, STA H=6, 64
        frames, a 2-layer Q-Former of width 512 cross-attending at every layer."""
        fields = dict(
            clip="openai/clip-vit-base-patch16",
            timesformer="facebook/timesformer-base-finetuned-k400",
            qformer=QFormerConfig(
                hidden_size=512,
                num_hidden_layers=2,
                num_attention_heads=8,
                intermediate_size=2048,
                cross_attention_frequency=1,
                encoder_hidden_size=512,
            ),
            num_frames=64,
            sta_layers=6,
            sta_heads=8,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def tiny(cls, clip: str, *, width: int = 32, **overrides) -> CMDCLConfig:
        """A CPU-sized model for tests and the demo. ``clip`` is a directory written by
        :func:`cmdcl_jax.models.tiny_clip.write_tiny_clip` at the same ``width`` (32px
        frames). The random TimeSformer has that width and a time table of ``num_frames``
        rows (no interpolation).

        ``init_std`` keeps ``std * sqrt(width)`` at BERT-base's ``0.02 * sqrt(768)``: with
        0.02 at width 32 every Linear shrinks its input ~9-fold and the plain model sat at
        ln C for ~500 steps on unconfounded CausalKitchen (batch 16, lr 3e-3, final loss
        1.43 after 1000); scaled, ~100 steps (docs/model.md)."""
        fields = dict(
            clip=clip,
            timesformer="",
            qformer=QFormerConfig(
                hidden_size=width,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=2 * width,
                cross_attention_frequency=1,
                encoder_hidden_size=width,
            ),
            num_frames=8,
            sta_layers=1,
            sta_heads=2,
            class_chunk=4,
            init_std=BERT_INIT_STD * math.sqrt(768 / width),
        )
        fields = {**fields, **overrides}
        fields.setdefault(
            "timesformer_arch",
            dataclasses.replace(
                TimesformerConfig.tiny(),
                hidden_size=width,
                intermediate_size=2 * width,
                num_frames=fields["num_frames"],
            ),
        )
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Architectures:
    """Shapes of the pretrained parts, read from their checkpoints' config files."""

    clip: ClipConfig
    timesformer: TimesformerConfig
    qformer: QFormerConfig


def read_architectures(cfg: CMDCLConfig) -> Architectures:
    """Reads the CLIP (and TimeSformer, Q-Former, when given) config files of ``cfg``."""
    clip = ClipConfig.read(hf_weights.resolve(cfg.clip))
    timesformer = cfg.timesformer_arch
    if cfg.timesformer:
        timesformer = TimesformerConfig.read(hf_weights.resolve(cfg.timesformer))
    qformer = cfg.qformer
    if cfg.qformer_source:
        q_dir = hf_weights.resolve(cfg.qformer_source)
        qformer = QFormerConfig.from_hf(
            hf_weights.read_config(q_dir, ["blip_2_qformer", "blip-2"]),
            source=str(q_dir / "config.json"),
        )
    d = clip.projection_dim
    if (qformer.hidden_size, qformer.encoder_hidden_size) != (d, d):
        raise ValueError(
            f"Q-Former hidden_size {qformer.hidden_size} and encoder_hidden_size "
            f"{qformer.encoder_hidden_size} must both equal CLIP's projection_dim {d}"
        )
    return Architectures(clip, timesformer, qformer)


class CMDCL(nnx.Module):
    """The composed model. Call on uint8 video [B, L, H, W, 3]; returns logits [B, C].

    Args:
      cfg: model hyper-parameters.
      arch: shapes of CLIP, TimeSformer and Q-Former (:func:`read_architectures`).
      num_classes: C.
      rngs: initialisation randomness. :func:`build_cmdcl` then fills CLIP, the class
        text embeddings T and (when given) TimeSformer/Q-Former from their checkpoints.
    """

    def __init__(self, cfg: CMDCLConfig, arch: Architectures, num_classes: int, *, rngs: nnx.Rngs):
        if cfg.text_scale not in TEXT_SCALES:
            raise ValueError(f"text_scale {cfg.text_scale!r} not one of {sorted(TEXT_SCALES)}")
        if cfg.tci_mode not in TCI_MODES:
            raise ValueError(f"tci_mode {cfg.tci_mode!r} not one of {TCI_MODES}")
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        d = arch.clip.projection_dim
        self.cfg = cfg
        self.clip = ClipVision(arch.clip, **kw)
        text = jax.random.normal(rngs.params(), (num_classes, d))
        self.text_embeddings = nnx.Param(normalize(text))  # T [C, D], set to T0 on build
        self.timesformer = Timesformer(
            arch.timesformer, remat=cfg.remat, attention=cfg.attention, **kw
        )
        self.video_proj = dense(arch.timesformer.hidden_size, d, **kw)
        self.video_norm = layer_norm(d, eps=1e-5, **kw) if cfg.video_norm else None
        self.tci_h = Approximator(d, **kw) if cfg.tci else None
        self.confounders = (
            ConfounderDictionary(
                cfg.num_confounders, num_classes, d, momentum=cfg.confounder_momentum
            )
            if cfg.tci and cfg.tci_mode == "dictionary"
            else None
        )
        if cfg.vci:
            self.sta = STA(
                d,
                num_layers=cfg.sta_layers,
                num_heads=cfg.sta_heads,
                num_frames=cfg.num_frames,
                **kw,
            )
            self.vci_g = Approximator(d, residual=cfg.g_residual, **kw)
        else:
            self.sta = self.vci_g = None
        self.qformer = QFormer(arch.qformer, **kw)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.head_weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_classes, d)))
        self.head_bias = nnx.Param(jnp.zeros((num_classes,)))
        self.log_tau = (
            nnx.Param(jnp.log(jnp.array([cfg.tau_t, cfg.tau_v], jnp.float32)))
            if cfg.learn_temperature
            else None
        )
        if cfg.init_std != BERT_INIT_STD:  # weights and tables were drawn N(0, 0.02^2)
            weights = nnx.state(
                self, nnx.All(TRAINABLE, nnx.Not(nnx.PathContains("text_embeddings")))
            )
            scale = cfg.init_std / BERT_INIT_STD
            nnx.update(self, jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, weights))

    def temperatures(self) -> tuple[Array | float, Array | float]:
        """(tau_t, tau_v): learned when ``learn_temperature``, else the config's."""
        if self.log_tau is None:
            return self.cfg.tau_t, self.cfg.tau_v
        tau = jnp.exp(self.log_tau[...])
        return tau[0], tau[1]

    def clip_features(self, video: Array) -> Array:
        """V_P: the frozen CLIP's normalised embedding of every frame, [B, L, D], of uint8
        ``video`` [B, L, H, W, 3]; no gradient flows through it."""
        b, l, h, w, _ = video.shape
        frames = self.clip.normalize(video).reshape(b * l, h, w, 3)  # [B*L, H, W, 3]
        return jax.lax.stop_gradient(normalize(self.clip(frames))).reshape(b, l, -1)

    def __call__(
        self,
        video: Array,
        *,
        frames_clip: Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        fine_scores: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """Classifies clips.

        Args:
          video: uint8 frames [B, L, H, W, 3] (normalised here, per encoder).
          frames_clip: V_P [B, L, D] of ``video`` computed before (:meth:`clip_features`,
            the training loop's CLIP cache); None computes it here.
          deterministic: no dropout when True (evaluation).
          rngs: a ``dropout`` stream, needed when ``deterministic`` is False.
          fine_scores: also return SF [B, C, L, D] materialised (analysis only).

        Returns:
          ``(logits [B, C] float32, aux)`` with ``aux`` holding ``frames_clip`` V_P
          [B, L, D], ``frames_video`` V [B, L, D], ``text`` T' [B, C, D], ``video`` V'
          ([B, C, D] with VCI, else V), and with TCI ``scores`` S [B, C, L] and ``bias``
          [B, C, D] (each video's own), with VCI ``frames_sta`` VH [B, L, D] and ``vhat``
          [B, C, D].
        """
        b = video.shape[0]
        tau_t, tau_v = self.temperatures()
        v_p = self.clip_features(video) if frames_clip is None else frames_clip  # [B, L, D]
        text = self.text_embeddings[...]  # [C, D]
        aux = {"frames_clip": v_p}

        if self.tci_h is not None:
            s = bias_aware_scores(v_p, text, tau_t)  # [B, C, L]
            bias = jnp.einsum("bcl,bld->bcd", s, v_p)  # [B, C, D]
            evidence = bias
            if self.confounders is not None:  # E_b[b], the back-door sum's NWGM
                evidence = jnp.broadcast_to(self.confounders.expectation(), bias.shape)
            t_prime = self.tci_h(jnp.broadcast_to(text, bias.shape), evidence)  # [B, C, D]
            aux.update(scores=s, bias=bias)
        else:
            t_prime = jnp.broadcast_to(text, (b, *text.shape))  # [B, C, D]
        t_prime = normalize(t_prime) * TEXT_SCALES[self.cfg.text_scale](text.shape[-1])

        tokens, _ = self.timesformer(self.timesformer.normalize(video))  # [B, L, N, Dv]
        v = self.video_proj(tokens.mean(axis=2))  # [B, L, D]
        if self.video_norm is not None:
            v = self.video_norm(v)
        aux["frames_video"] = v
        if self.sta is not None:
            vh = self.sta(v)  # [B, L, D]
            vhat = fine_grained_pool(vh, t_prime, tau_v, chunk=self.cfg.class_chunk)  # [B, C, D]
            v_prime = self.vci_g(t_prime.astype(vhat.dtype), vhat)  # [B, C, D]
            aux.update(frames_sta=vh, vhat=vhat)
            if fine_scores:
                aux["fine_scores"] = fine_grained_scores(vh, t_prime, tau_v)  # [B, C, L, D]
        else:
            v_prime = v  # [B, L, D]

        f = self.qformer(t_prime, v_prime)  # [B, C, D]
        f = self.dropout(f, deterministic=deterministic, rngs=rngs)
        logits = jnp.einsum("bcd,cd->bc", f.astype(jnp.float32), self.head_weight[...])
        aux.update(text=t_prime, video=v_prime)
        return logits + self.head_bias[...], aux  # [B, C]

    def update_confounders(self, biases: Array) -> None:
        """With a confounder dictionary, one update from a training batch's ``bias``
        [N, C, D] (``aux["bias"]``); nothing otherwise."""
        if self.confounders is not None:
            self.confounders.update(biases)


def class_prompts(cfg: CMDCLConfig, class_names: Sequence[str]) -> list[str]:
    """The text prompt of every class: ``cfg.prompt_template`` filled with its name."""
    return [cfg.prompt_template.format(name) for name in class_names]


def text_embeddings(clip: Clip, source: str, prompts: Sequence[str]) -> np.ndarray:
    """T0 = normalize(CLIP text features) of ``prompts``: [C, D], float32.

    Tokenised with ``transformers.AutoTokenizer`` from the CLIP checkpoint ``source``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_weights.resolve(source)))
    batch = tokenizer(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=clip.cfg.text.max_position_embeddings,
        return_tensors="np",
    )
    features = clip.text(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    return np.asarray(normalize(features))


def build_cmdcl(
    cfg: CMDCLConfig,
    class_names: Sequence[str],
    *,
    seed: int = 0,
    place_clip: hf_weights.Place | None = None,
) -> CMDCL:
    """Builds CMDCL with its pretrained parts loaded and T initialised from T0.

    CLIP is always loaded from ``cfg.clip`` (each weight onto ``place_clip(shape)`` when
    given); TimeSformer and Q-Former from their sources when set, else randomly
    initialised. Everything else is randomly initialised.
    """
    arch = read_architectures(cfg)
    model = CMDCL(cfg, arch, len(class_names), rngs=nnx.Rngs(seed))
    dtype = jnp.dtype(cfg.dtype)
    clip = Clip.from_pretrained(cfg.clip, dtype=dtype, place=place_clip)
    model.text_embeddings[...] = jnp.asarray(
        text_embeddings(clip, cfg.clip, class_prompts(cfg, class_names))
    )
    model.clip = clip.vision
    if cfg.timesformer:
        model.timesformer = Timesformer.from_pretrained(
            cfg.timesformer, dtype=dtype, remat=cfg.remat, attention=cfg.attention
        )
    if cfg.qformer_source:
        model.qformer = QFormer.from_pretrained(cfg.qformer_source, dtype=dtype)
    return model


def count_params(model: nnx.Module, wrt=nnx.Param) -> int:
    """Number of scalars in the parameters of ``model`` selected by ``wrt``."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, wrt)))
