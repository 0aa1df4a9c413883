"""The two causal interventions of CMDCL (paper Sec. 3.2; ``docs/model.md``).

Notation: B batch, L frames, C classes, D joint embedding width.

* TCI (back-door adjustment, Eqs. 2-3): bias-aware scores ``S = softmax_l(<V_P, T> / tau_t)``
  [B, C, L], bias surrogate ``Bias = S @ V_P`` [B, C, D], debiased text
  ``T' = h(T, Bias)`` [B, C, D].
* VCI (front-door adjustment, Eqs. 4-8): STA over the video encoder's frame tokens gives
  ``VH`` [B, L, D]; per-channel scores ``SF = softmax_l(VH * T' / tau_v)`` [B, C, L, D];
  ``Vhat = sum_l SF * VH`` [B, C, D]; deconfounded video ``V' = g(T', Vhat)`` [B, C, D].

``SF`` is never materialised whole in the forward pass used for training:
:func:`fine_grained_pool` computes it a chunk of classes at a time under
``jax.checkpoint``, so peak memory is ``B * chunk * L * D`` instead of ``B * C * L * D``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cmdcl_jax.models.layers import Mlp, PreNormBlock, layer_norm

Array = jax.Array


RESIDUALS = ("anchor", "evidence", "none")


class Approximator(nnx.Module):
    """``h`` (TCI) and ``g`` (VCI): ``LayerNorm(skip + MLP([anchor; evidence]))``.

    Our reading of the NWGM approximators: an MLP ``2D -> D -> D`` with GELU on the
    concatenation (the paper's ``h([t_c, b_c])``, ``g([t'_c, vhat_c])``), plus a skip
    connection from one input: ``residual`` picks ``"anchor"`` (``T[c]`` for ``h``,
    ``T'[b, c]`` for ``g``), ``"evidence"`` (``Bias`` / ``Vhat``) or ``"none"``.
    """

    def __init__(
        self,
        dim: int,
        *,
        residual: str = "anchor",
        eps: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if residual not in RESIDUALS:
            raise ValueError(f"approximator residual {residual!r} not one of {RESIDUALS}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.residual = residual
        self.mlp = Mlp(2 * dim, dim, act="gelu", out_dim=dim, **kw)
        self.norm = layer_norm(dim, eps=eps, **kw)

    def __call__(self, anchor: Array, evidence: Array) -> Array:
        """anchor, evidence [..., D] -> [..., D]."""
        out = self.mlp(jnp.concatenate([anchor, evidence], axis=-1))  # [..., D]
        if self.residual == "anchor":
            out = out + anchor
        elif self.residual == "evidence":
            out = out + evidence
        return self.norm(out)


def bias_aware_scores(frames: Array, text: Array, tau: Array | float) -> Array:
    """``S[b, c, l] = softmax_l(<frames[b, l], text[c]> / tau)``.

    Args:
      frames: V_P [B, L, D]; text: T [C, D].

    Returns:
      S [B, C, L] in float32, summing to 1 over L.
    """
    logits = jnp.einsum("bld,cd->bcl", frames, text).astype(jnp.float32) / tau  # [B, C, L]
    return jax.nn.softmax(logits, axis=-1)


def fine_grained_scores(vh: Array, text: Array, tau: Array | float) -> Array:
    """``SF[b, c, l, d] = softmax_l(vh[b, l, d] * text[b, c, d] / tau)``, materialised.

    Args:
      vh: [B, L, D]; text: T' [B, C, D].

    Returns:
      SF [B, C, L, D] in float32. For analysis on small inputs only; training uses
      :func:`fine_grained_pool`.
    """
    logits = vh[:, None, :, :].astype(jnp.float32) * text[:, :, None, :] / tau  # [B, C, L, D]
    return jax.nn.softmax(logits, axis=2)


def fine_grained_pool(vh: Array, text: Array, tau: Array | float, *, chunk: int) -> Array:
    """``Vhat[b, c, d] = sum_l SF[b, c, l, d] * vh[b, l, d]``, ``chunk`` classes at a time.

    Each chunk runs under ``jax.checkpoint`` inside ``lax.map``, so neither the forward
    nor the backward pass holds more than ``B * chunk * L * D`` scores at once.

    Args:
      vh: [B, L, D]; text: T' [B, C, D]; chunk: classes per step (``<= 0``: all at once).

    Returns:
      Vhat [B, C, D] in vh's dtype.
    """
    b, c, d = text.shape
    vh32 = vh.astype(jnp.float32)

    def pool(t: Array) -> Array:  # t: [B, k, D]
        sf = fine_grained_scores(vh32, t, tau)  # [B, k, L, D]
        return jnp.einsum("bkld,bld->bkd", sf, vh32)  # [B, k, D]

    if chunk <= 0 or chunk >= c:
        return pool(text).astype(vh.dtype)
    n = -(-c // chunk)
    padded = jnp.pad(text, ((0, 0), (0, n * chunk - c), (0, 0)))  # [B, n*k, D]
    chunks = padded.reshape(b, n, chunk, d).transpose(1, 0, 2, 3)  # [n, B, k, D]
    out = jax.lax.map(jax.checkpoint(pool), chunks)  # [n, B, k, D]
    return out.transpose(1, 0, 2, 3).reshape(b, n * chunk, d)[:, :c].astype(vh.dtype)


class STA(nnx.Module):
    """Spatio-temporal aggregation over frame tokens: ``H`` pre-LN blocks, then LayerNorm.

    A learnable temporal position embedding of ``num_frames`` rows is added first; at
    another frame count it is linearly interpolated over time.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_layers: int,
        num_heads: int,
        num_frames: int,
        mlp_ratio: int = 4,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (num_frames, dim), param_dtype)
        )
        self.blocks = nnx.List(
            [PreNormBlock(dim, num_heads, mlp_ratio * dim, **kw) for _ in range(num_layers)]
        )
        self.norm = layer_norm(dim, eps=1e-5, **kw)

    def __call__(self, frames: Array) -> Array:
        """frames V [B, L, D] -> VH [B, L, D]."""
        pos = interpolate_time(self.position[...], frames.shape[1])  # [L, D]
        x = frames + pos.astype(frames.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def interpolate_time(table: Array, length: int) -> Array:
    """Linearly resizes a per-frame table [T, D] to [length, D] (identity if equal)."""
    if table.shape[0] == length:
        return table
    return jax.image.resize(table, (length, table.shape[1]), method="linear")


class ConfounderStatistic(nnx.Variable):
    """Non-trainable state estimated from the training data (the TCI confounder set)."""


TCI_MODES = ("sample", "dictionary")


class ConfounderDictionary(nnx.Module):
    """The confounder set of TCI's back-door adjustment (Eq. 2) and its prior P(b).

    K prototypes ``b_k`` of the class-wise bias ``Bias`` [C, D], kept by online k-means
    over the training videos' biases, and their assignment frequencies ``f_k`` [K]
    (an exponential moving average), so ``P(b_k) = f_k / sum_j f_j``. The NWGM step of
    Eq. 3 puts the approximator over the expectation: ``T'[c] = h(T[c], E_b[b][c])`` with
    ``E_b[b] = sum_k P(b_k) b_k`` [C, D] (:meth:`expectation`), the same for every video.
    """

    def __init__(self, num_entries: int, num_classes: int, dim: int, *, momentum: float):
        if num_entries < 1:
            raise ValueError(f"confounder dictionary needs at least 1 entry, got {num_entries}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"confounder dictionary momentum {momentum} not in [0, 1)")
        self.momentum = momentum
        self.prototypes = ConfounderStatistic(jnp.zeros((num_entries, num_classes, dim)))
        self.frequencies = ConfounderStatistic(jnp.zeros((num_entries,)))

    def expectation(self) -> Array:
        """``E_b[b] = sum_k P(b_k) b_k`` [C, D]; zeros while the dictionary is empty."""
        f = self.frequencies[...]
        total = f.sum()
        prior = f / jnp.where(total > 0, total, 1.0)  # [K]
        return jnp.einsum("k,kcd->cd", prior, self.prototypes[...])

    def update(self, biases: Array) -> None:
        """One online k-means step on a batch of biases [N, C, D] (N >= K).

        The first batch fills the dictionary with its first K biases at equal frequency;
        later each bias joins its nearest prototype (squared distance over C x D), every
        prototype moves towards the mean of its members, ``b_k <- m b_k + (1 - m) mean_k``,
        and the frequencies follow the members' share, ``f_k <- m f_k + (1 - m) n_k / N``.
        """
        k = self.prototypes.shape[0]
        n = biases.shape[0]
        if n < k:
            raise ValueError(f"a batch of {n} biases cannot fill a dictionary of {k} entries")
        x = jax.lax.stop_gradient(biases).astype(jnp.float32).reshape(n, -1)  # [N, C*D]
        protos = self.prototypes[...].reshape(k, -1)  # [K, C*D]
        distance = (x**2).sum(-1, keepdims=True) - 2 * x @ protos.T + (protos**2).sum(-1)  # [N, K]
        members = jax.nn.one_hot(jnp.argmin(distance, axis=-1), k)  # [N, K]
        counts = members.sum(0)  # [K]
        means = members.T @ x / jnp.maximum(counts, 1.0)[:, None]  # [K, C*D]
        m = self.momentum
        moved = jnp.where(counts[:, None] > 0, m * protos + (1 - m) * means, protos)
        freq = m * self.frequencies[...] + (1 - m) * counts / n
        empty = self.frequencies[...].sum() == 0
        self.prototypes[...] = jnp.where(empty, x[:k], moved).reshape(self.prototypes.shape)
        self.frequencies[...] = jnp.where(empty, jnp.full((k,), 1.0 / k), freq)
