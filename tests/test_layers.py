"""Dense layers: the product with its hand-written backward pass gives autodiff's
gradients, on the CPU's path (both operands' ways round) and on the other backends', and
for an input wider than its output compiles on the CPU to products that never contract
the token axis of their left operand.
Attention: the explicit einsums equal XLA's attention on both backends' paths, and "auto"
picks per backend, dtype and length."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cmdcl_jax.models import layers

# The weight gradient sums N = 15 products per entry in another order than autodiff's:
# float32 rounding (eps 1.2e-7) of sums of terms of size ~1 stays far below 1e-5.
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _grads(dot_general, x, w):
    def loss(x, w):
        y = dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        return jnp.sum(jnp.sin(y))

    return jax.grad(loss, argnums=(0, 1))(x, w)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("width_in,width_out", [(7, 4), (4, 7)])  # g^T copied; plain
def test_dense_gradients_equal_autodiff(backend, width_in, width_out, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # read when tracing
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 5, width_in))  # N = 15 tokens
    w = jax.random.normal(kw, (width_in, width_out))
    ours = _grads(layers.linear_dot_general, x, w)
    autodiff = _grads(lax.dot_general, x, w)
    for a, b in zip(ours, autodiff, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, **TOL)


def test_dense_forward_is_the_plain_product_and_other_products_are_refused():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    plain = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(
        layers.linear_dot_general(x, w, plain), lax.dot_general(x, w, plain)
    )
    with pytest.raises(ValueError, match="not a dense layer's product"):
        layers.linear_dot_general(x, w.T, (((1,), (1,)), ((), ())))


PLAIN = (((1,), (0,)), ((), ()))  # x [N, in] @ w [in, out]


def test_cpu_weight_gradient_of_a_wide_input_never_contracts_the_left_token_axis():
    """XLA's CPU dot runs [N, a] x [N, b] contracting N, the first axis of its left operand,
    at a third of its rate when a > b (BENCHMARKS.md); XLA made that product again by
    swapping the operands of the transposed [out, in] product, until a barrier kept it."""
    x, w = jnp.ones((64, 16)), jnp.ones((16, 4))
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.linear_dot_general(x, w, PLAIN)), (0, 1)))
    hlo = grads.lower(x, w).compile().as_text()
    contracted = re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d+)\}", hlo)
    assert len(contracted) == 2 and "0" not in contracted, contracted  # dx and dw


def _qkv(keys: int = 7):
    """q [2, 5, 6, 8], k and v [2, 5, keys, 8]: 2 heads of width 4."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 5, 6, 8))
    return q, jax.random.normal(kk, (2, 5, keys, 8)), jax.random.normal(kv, (2, 5, keys, 8))


def _attention_and_grads(implementation, q, k, v):
    def loss(q, k, v):
        out = layers.multi_head_attention(q, k, v, 2, implementation=implementation)
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("backend", ["cpu", "gpu"])  # with and without the CPU's barriers
def test_explicit_attention_equals_xla_attention(backend, monkeypatch):
    q, k, v = _qkv()
    reference = _attention_and_grads("xla", q, k, v)  # XLA's, traced before the patch
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    ours = _attention_and_grads("explicit", q, k, v)
    # Sums of 4-7 float32 products of size ~1 in other orders: a few eps, far below 1e-5.
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    # A mask keeping the first 4 keys: attention over those 4 alone. Causal: query t
    # attends over keys 0..t.
    masked = layers.multi_head_attention(q, k, v, 2, mask=jnp.arange(7) < 4)
    np.testing.assert_allclose(
        masked, layers.multi_head_attention(q, k[:, :, :4], v[:, :, :4], 2), **TOL
    )
    k, v = k[:, :, :6], v[:, :, :6]
    causal = layers.multi_head_attention(q, k, v, 2, causal=True)
    for t in range(6):
        alone = layers.multi_head_attention(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], 2
        )
        np.testing.assert_allclose(causal[:, :, t : t + 1], alone, **TOL)


@pytest.mark.parametrize(
    "backend,dtype,kv_len,expected",
    [
        ("cpu", jnp.float32, 65, "explicit"),
        ("cpu", jnp.float32, 8, "xla"),
        ("gpu", jnp.bfloat16, 8, "cudnn"),
        ("gpu", jnp.bfloat16, 197, "xla"),  # odd length: cuDNN's training kernels refuse it
        ("gpu", jnp.float32, 64, "xla"),
        ("tpu", jnp.float32, 64, "xla"),
    ],
)
def test_auto_attention_choice(backend, dtype, kv_len, expected, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert layers._auto_attention(dtype, 64, kv_len, kv_len) == expected
