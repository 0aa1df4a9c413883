"""Dense layers: the product with its hand-written backward pass gives autodiff's
gradients, on the CPU's path (both operands' ways round) and on the other backends'."""

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
@pytest.mark.parametrize("width_in,width_out", [(7, 4), (4, 7)])  # which operand is copied
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
