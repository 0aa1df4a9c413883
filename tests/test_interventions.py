"""TCI and VCI operators against a plain NumPy reading of docs/model.md, and their memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmdcl_jax.models.interventions import (
    ConfounderDictionary,
    bias_aware_scores,
    fine_grained_pool,
    fine_grained_scores,
)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _numpy_reference(v_p, text, vh, t_prime, tau_t, tau_v):
    """docs/model.md's formulas, loop by loop where it reads clearest."""
    b, l, d = v_p.shape
    c = text.shape[0]
    s = np.zeros((b, c, l))
    for bi in range(b):
        for ci in range(c):
            s[bi, ci] = _softmax(np.array([v_p[bi, li] @ text[ci] for li in range(l)]) / tau_t, 0)
    bias = np.einsum("bcl,bld->bcd", s, v_p)
    sf = np.zeros((b, c, l, d))
    for bi in range(b):
        for ci in range(c):
            for di in range(d):
                sf[bi, ci, :, di] = _softmax(vh[bi, :, di] * t_prime[bi, ci, di] / tau_v, 0)
    vhat = (sf * vh[:, None]).sum(axis=2)
    return s, bias, sf, vhat


def test_scores_and_pools_equal_numpy_recomputation():
    rng = np.random.default_rng(0)
    b, l, c, d = 2, 5, 7, 6
    v_p = rng.normal(size=(b, l, d)).astype(np.float32)
    v_p /= np.linalg.norm(v_p, axis=-1, keepdims=True)
    text = rng.normal(size=(c, d)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    vh = rng.normal(size=(b, l, d)).astype(np.float32)
    t_prime = rng.normal(size=(b, c, d)).astype(np.float32)
    tau_t, tau_v = 0.07, 0.5
    s_ref, bias_ref, sf_ref, vhat_ref = _numpy_reference(v_p, text, vh, t_prime, tau_t, tau_v)

    # float32 on both sides. A softmax of logits up to |x| ~ 30 (14 for S: unit vectors over
    # 0.07) rounds each exp(x) by |x| eps relative, ~4e-6; pooled sums over L = 5 of terms up
    # to 3 add L eps * 3 absolute. Measured: 2e-6 relative, 2.4e-7 absolute.
    f32 = {"rtol": 2e-5, "atol": 1e-5}
    s = bias_aware_scores(jnp.asarray(v_p), jnp.asarray(text), tau_t)
    # sums to 1 over frames, to (L + 2) eps
    np.testing.assert_allclose(s.sum(axis=-1), 1.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, s_ref, **f32)
    bias = jnp.einsum("bcl,bld->bcd", s, v_p)
    np.testing.assert_allclose(bias, bias_ref, **f32)
    sf = fine_grained_scores(jnp.asarray(vh), jnp.asarray(t_prime), tau_v)
    np.testing.assert_allclose(sf, sf_ref, **f32)
    for chunk in (0, 3, 7, 100):  # all at once, ragged chunks, exact, larger than C
        vhat = fine_grained_pool(jnp.asarray(vh), jnp.asarray(t_prime), tau_v, chunk=chunk)
        np.testing.assert_allclose(vhat, vhat_ref, **f32, err_msg=f"chunk={chunk}")


def test_chunked_gradient_equals_unchunked_gradient():
    rng = np.random.default_rng(1)
    vh = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    t_prime = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)

    def loss(vh, t, chunk):
        return jnp.sum(fine_grained_pool(vh, t, 0.3, chunk=chunk) ** 2)

    want = jax.grad(loss, argnums=(0, 1))(vh, t_prime, 0)
    got = jax.grad(loss, argnums=(0, 1))(vh, t_prime, 3)
    # Gradients up to 23, each a float32 sum over C = 10 classes and L = 4 frames of terms as
    # large, ordered differently in chunks: ~40 eps of 23 is 1e-4 absolute (1.2e-5 measured).
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def _compiled_temp_bytes(chunk: int, b: int, c: int, l: int, d: int) -> int:
    def loss(vh, t):
        return jnp.sum(fine_grained_pool(vh, t, 0.07, chunk=chunk))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    args = (
        jax.ShapeDtypeStruct((b, l, d), jnp.float32),
        jax.ShapeDtypeStruct((b, c, d), jnp.float32),
    )
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_fine_grained_step_at_coin_scale_does_not_materialise_bclD():
    """C=778 (COIN steps), L=64, D=512, B=8: one SF is 8*778*64*512*4 B = 778 MiB."""
    b, c, l, d = 8, 778, 64, 512
    sf_bytes = b * c * l * d * 4
    whole = _compiled_temp_bytes(0, b, c, l, d)
    chunked = _compiled_temp_bytes(64, b, c, l, d)
    print(
        f"\nfine-grained value+grad, B={b} C={c} L={l} D={d}: compiled temp "
        f"{chunked / 2**20:.0f} MiB in chunks of 64 classes, {whole / 2**20:.0f} MiB at once; "
        f"one SF is {sf_bytes / 2**20:.0f} MiB"
    )
    assert whole >= sf_bytes  # the unchunked step does hold SF (the check can fail)
    assert chunked < sf_bytes / 2
    assert chunked < whole / 8


def test_confounder_dictionary_online_k_means():
    """First batch: the dictionary takes its first K biases at P(b) = 1/K. Then each bias
    joins its nearest prototype, which moves by (1 - m) towards its members' mean, and the
    frequencies follow the members' share (all values exact in binary floating point)."""
    d = ConfounderDictionary(2, 1, 2, momentum=0.5)
    np.testing.assert_array_equal(d.expectation(), np.zeros((1, 2)))  # empty
    first = jnp.array([[[0.0, 0.0]], [[4.0, 4.0]], [[9.0, 9.0]]])  # [N=3, C=1, D=2]
    d.update(first)
    np.testing.assert_array_equal(d.prototypes[...], first[:2])
    np.testing.assert_array_equal(d.frequencies[...], [0.5, 0.5])
    d.update(jnp.array([[[1.0, 1.0]], [[3.0, 3.0]], [[5.0, 5.0]], [[0.0, 2.0]]]))
    # Members: {(1,1), (0,2)} -> prototype 0, mean (0.5, 1.5); {(3,3), (5,5)} -> 1, (4, 4).
    np.testing.assert_array_equal(d.prototypes[...], [[[0.25, 0.75]], [[4.0, 4.0]]])
    np.testing.assert_array_equal(d.frequencies[...], [0.5, 0.5])
    d.update(jnp.array([[[4.0, 4.0]], [[4.0, 4.0]]]))  # prototype 0 gets none: stays
    np.testing.assert_array_equal(d.prototypes[...], [[[0.25, 0.75]], [[4.0, 4.0]]])
    np.testing.assert_array_equal(d.frequencies[...], [0.25, 0.75])
    # E_b[b] = sum_k P(b_k) b_k
    np.testing.assert_allclose(d.expectation(), [[0.25 * 0.25 + 0.75 * 4, 0.25 * 0.75 + 3]])
    with pytest.raises(ValueError, match="cannot fill a dictionary of 2"):
        ConfounderDictionary(2, 1, 2, momentum=0.5).update(first[:1])
