"""Building blocks shared by the CLIP, TimeSformer, Q-Former and STA stacks.

Every module takes ``dtype`` (compute dtype, e.g. ``jnp.bfloat16``) and ``param_dtype``
(storage dtype, float32 by default). Parameter names follow the roles of the Hugging Face
modules they are ported from (``query``/``key``/``value``/``out``, ``fc1``/``fc2``), so
the weight maps in each model file stay short.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

Array = jax.Array


def _gelu(x: Array) -> Array:
    """Exact GELU, x * Phi(x), written with erf as PyTorch computes it: XLA's CPU erf is one
    polynomial, where ``jax.nn.gelu``'s erfc takes exponentials and selects (measured: 0.36
    against 0.68 ms for [2048, 512] float32 on 2 cores); the two differ by under 1e-6."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2**-0.5)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


# How attention is computed: "explicit" (the einsums and float32 softmax below), "xla" or
# "cudnn" (``jax.nn.dot_product_attention`` with that implementation), or "auto": cuDNN's
# fused kernel on an NVIDIA GPU for bfloat16/float16 heads it takes (width a multiple of 8,
# at most 128; even sequence lengths, as its training kernels need: a ViT's 197 tokens are
# refused); on a CPU the explicit einsums from 32 keys on; XLA's otherwise (cuDNN has no
# float32 kernel). On a CPU, XLA fuses either form's products with the softmax into one
# library call; an optimisation barrier between them is dropped before that fusion (the
# compiled step is the same with or without one, BENCHMARKS.md).
ATTENTION_IMPLEMENTATIONS = ("auto", "explicit", "xla", "cudnn")


def activation(name: str) -> Callable[[Array], Array]:
    """Returns the activation a Hugging Face config names (``hidden_act``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
    std: float = 0.02,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """A linear layer initialised N(0, std^2), bias zero (the BERT/ViT convention), whose
    products go through :func:`linear_dot_general`."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(std),
        dot_general=linear_dot_general,
        rngs=rngs,
    )


def linear_dot_general(x, w, dimension_numbers, precision=None, out_sharding=None, **kwargs):
    """``lax.dot_general`` for ``nnx.Linear``'s product x [..., in] @ w [in, out], with the
    weight gradient of a wide x computed as XLA's CPU backend runs it fastest.

    The weight gradient x^T g contracts the token axis, the first of both [N, in] and
    [N, out]. When x is wider than g (an MLP's fc2: [2048, 512] against [2048, 128] at the
    ``small`` benchmark), XLA's CPU dot runs that form at a third of its rate: 1425 us
    alone, against ~800 once g is transposed into a copy of its own and the small
    [out, in] product is transposed back (optimisation barriers keep XLA from folding
    either transpose into the product). When x is no wider than g the two forms are level
    alone (288 against 295 us at 128 -> 128, 790 against 824 at 128 -> 512) and a copy of
    x^T costs more in the step than it saves: the ``small`` step takes 0.96-0.97 of the
    time it took with one (BENCHMARKS.md), so autodiff's form stays. On other backends the
    backward pass is autodiff's own arithmetic."""
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or w.ndim != 2:
        raise ValueError(f"not a dense layer's product: dimension_numbers {dimension_numbers}")
    if out_sharding is not None or kwargs:
        raise ValueError("linear_dot_general takes no out_sharding or preferred_element_type")
    return _linear(x, w, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x: Array, w: Array, precision) -> Array:
    """x [..., in] @ w [in, out] -> [..., out]."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _linear_forward(x, w, precision):
    return _linear(x, w, precision), (x, w)


def _linear_backward(precision, residuals, g):
    """g [..., out] -> (dx [..., in], dw [in, out])."""
    x, w = residuals
    dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # [N, in], [N, out]
    tokens = (((0,), (0,)), ((), ()))
    if jax.default_backend() != "cpu" or x2.shape[1] <= g2.shape[1]:
        dw = lax.dot_general(x2, g2, tokens, precision=precision)
    else:  # copy g^T [out, N], the narrower; then transpose the [out, in] product
        gt = lax.optimization_barrier(g2.T)
        dw_t = lax.dot_general(gt, x2, (((1,), (0,)), ((), ())), precision=precision)
        # Unbarred, XLA folds the transpose into the product by swapping its operands,
        # which contracts x's token axis again (131 against ~440 GFLOP/s alone for the
        # ``small`` MLP's [2048, 512] x [128, 2048]).
        dw = lax.optimization_barrier(dw_t).T
    return dx, dw.astype(w.dtype)


_linear.defvjp(_linear_forward, _linear_backward)


def layer_norm(dim: int, *, eps: float, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    """LayerNorm with PyTorch's variance (mean of squares about the mean)."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head attention with separate query/key/value/out projections.

    Args:
      dim: width of the queries and of the output.
      num_heads: number of heads; ``dim`` must divide by it.
      kv_dim: width of the key/value source (cross-attention); ``dim`` when None.
      use_bias: biases on the four projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kv_dim: int | None = None,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"width {dim} does not divide into {num_heads} heads")
        kv_dim = dim if kv_dim is None else kv_dim
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.query = dense(dim, dim, **kw)
        self.key = dense(kv_dim, dim, **kw)
        self.value = dense(kv_dim, dim, **kw)
        self.out = dense(dim, dim, **kw)

    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        *,
        mask: Array | None = None,
        is_causal: bool = False,
    ) -> Array:
        """Attends ``x`` [..., T, dim] over ``context`` [..., S, kv_dim] (``x`` itself if None).

        ``mask`` broadcasts to [..., heads, T, S]; True keeps a pair.
        """
        context = x if context is None else context
        q = self.query(x)  # [..., T, dim]
        k = self.key(context)  # [..., S, dim]
        v = self.value(context)  # [..., S, dim]
        return self.out(multi_head_attention(q, k, v, self.num_heads, mask=mask, causal=is_causal))


def multi_head_attention(
    q: Array,
    k: Array,
    v: Array,
    num_heads: int,
    *,
    mask=None,
    causal: bool = False,
    implementation: str = "explicit",
) -> Array:
    """Scaled dot-product attention over heads split from the last axis.

    Args:
      q: [..., T, H*Dh]; k, v: [..., S, H*Dh].
      mask: optional boolean, broadcastable to [..., H, T, S]; True keeps a pair
        ("explicit" only).
      causal: apply a lower-triangular mask (T == S).
      implementation: one of ``ATTENTION_IMPLEMENTATIONS``.

    Returns:
      [..., T, H*Dh]. Softmax runs in float32 whatever the compute dtype.
    """
    *lead, t, width = q.shape
    s = k.shape[-2]
    dh = width // num_heads
    if implementation == "auto" and mask is None:
        implementation = _auto_attention(q.dtype, dh, t, s)
    if implementation != "explicit":
        if mask is not None:
            raise ValueError(f"attention {implementation!r} takes no mask; use 'explicit'")
        out = jax.nn.dot_product_attention(
            q.reshape(-1, t, num_heads, dh),  # [B', T, H, Dh]
            k.reshape(-1, s, num_heads, dh),
            v.reshape(-1, s, num_heads, dh),
            is_causal=causal,
            implementation=implementation,
        )  # [B', T, H, Dh]
        return out.reshape(*lead, t, width)
    q = q.reshape(*lead, t, num_heads, dh).swapaxes(-3, -2)  # [..., H, T, Dh]
    k = k.reshape(*lead, s, num_heads, dh).swapaxes(-3, -2)  # [..., H, S, Dh]
    v = v.reshape(*lead, s, num_heads, dh).swapaxes(-3, -2)  # [..., H, S, Dh]
    logits = jnp.einsum("...htd,...hsd->...hts", q, k) * (dh**-0.5)  # [..., H, T, S]
    logits = logits.astype(jnp.float32)
    if causal:
        tril = jnp.tril(jnp.ones((t, s), bool))
        mask = tril if mask is None else mask & tril
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [..., H, T, S]
    out = jnp.einsum("...hts,...hsd->...htd", probs, v)  # [..., H, T, Dh]
    return out.swapaxes(-3, -2).reshape(*lead, t, width)


def _auto_attention(dtype, head_dim: int, q_len: int, kv_len: int) -> str:
    """The implementation "auto" picks for heads of ``dtype`` and width ``head_dim`` over
    ``q_len`` queries and ``kv_len`` keys."""
    backend = jax.default_backend()
    cudnn = backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    shapes = head_dim % 8 == 0 and head_dim <= 128 and q_len % 2 == 0 and kv_len % 2 == 0
    if cudnn and shapes:
        return "cudnn"
    return "explicit" if backend == "cpu" and kv_len >= 32 else "xla"


def check_attention(name: str) -> str:
    """Returns ``name`` if it is one of ``ATTENTION_IMPLEMENTATIONS``, else raises."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention {name!r} not one of {ATTENTION_IMPLEMENTATIONS}")
    return name


class Mlp(nnx.Module):
    """Two-layer feed-forward block ``fc2(act(fc1(x)))``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        act: str = "gelu",
        out_dim: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(act)
        self.fc1 = dense(dim, hidden, **kw)
        self.fc2 = dense(hidden, dim if out_dim is None else out_dim, **kw)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))  # [..., out_dim]


class PreNormBlock(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    The block of CLIP's towers and of CMDCL's STA (names follow ``CLIPEncoderLayer``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        act: str = "gelu",
        eps: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(dim, eps=eps, **kw)
        self.self_attn = Attention(dim, num_heads, **kw)
        self.layer_norm2 = layer_norm(dim, eps=eps, **kw)
        self.mlp = Mlp(dim, mlp_dim, act=act, **kw)

    def __call__(self, x: Array, *, is_causal: bool = False, mask: Array | None = None) -> Array:
        """[..., S, dim] -> [..., S, dim]."""
        x = x + self.self_attn(self.layer_norm1(x), is_causal=is_causal, mask=mask)
        return x + self.mlp(self.layer_norm2(x))


def normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """L2-normalises ``x`` along ``axis`` (in float32)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)
