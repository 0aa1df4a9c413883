"""The compiled steps: one optimizer step (with gradient accumulation) and one eval step.

Module-level ``jax.jit`` functions, so every run of one model shares their compilation;
the trainable state is donated. The training loop calls :class:`BoundTrainStep`
instead: ``train_step`` hashes its static arguments at every call (hashing the model's
``graphdef`` took 15 ms at the tiny preset), and flattens its ``nnx.Variable`` trees.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cmdcl_jax import sharding
from cmdcl_jax.models.cmdcl import CONFOUNDERS


def loss_fn(logits: jax.Array, labels: jax.Array, kind: str) -> jax.Array:
    """Softmax cross-entropy (labels int [B]) or sigmoid BCE (labels multi-hot [B, C])."""
    if kind == "single":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()


def initial_state(params, confounders, tx: optax.GradientTransformation) -> dict:
    """The train step's state at step 0: ``{"step", "params", "opt_state", "confounders"}``
    from a model's trainable ``params`` and TCI ``confounders`` (its ``nnx.split`` with
    ``TRAINABLE, CONFOUNDERS, ...``); unplaced."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "confounders": confounders,
    }


def _train_step(
    state,
    frozen,
    batch,
    base_key,
    *,
    graphdef,
    tx,
    kind,
    accum_steps,
    mesh=None,
    fsdp_min_size=sharding.MIN_SHARDED_SIZE,
):
    """One optimizer step on a global batch, split in ``accum_steps`` micro-batches.

    Args:
      state: ``{"step", "params", "opt_state", "confounders"}``; params are the trainable
        state, confounders TCI's dictionary (updated once per step from the whole batch's
        biases, after the gradient, which it does not enter).
      frozen: the rest of the model (CLIP).
      batch: ``video`` uint8 [B, L, H, W, 3] and ``label``, and ``frames_clip`` V_P
        [B, L, D] when the loop caches the frozen CLIP's features.
      base_key: the run's key; the step's dropout key is ``fold_in(base_key, step)``.
      mesh, fsdp_min_size: with a mesh, the new state is laid out as
        ``sharding.tree_shardings`` places it (else the compiler may leave sharded
        parameters gathered).

    Returns:
      (new state, ``{"loss", "grad_norm"}``).
    """
    key = jax.random.fold_in(base_key, state["step"])
    has_dictionary = bool(jax.tree.leaves(state["confounders"]))  # static: tci_mode

    def micro_loss(params, micro, micro_key):
        model = nnx.merge(graphdef, params, state["confounders"], frozen)
        logits, aux = model(
            micro["video"],
            frames_clip=micro.get("frames_clip"),
            deterministic=False,
            rngs=nnx.Rngs(dropout=micro_key),
        )
        bias = aux["bias"] if has_dictionary else None  # [b, C, D], the dictionary's input
        return loss_fn(logits, micro["label"], kind), bias

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if accum_steps == 1:
        (loss, biases), grads = grad_fn(state["params"], batch, key)
    else:
        micro = jax.tree.map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch
        )

        def body(carry, xs):
            i, mb = xs
            (loss, bias), grads = grad_fn(state["params"], mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (loss, grads)), bias

        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), biases = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
        biases = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), biases)  # [B, C, D]
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    confounders = state["confounders"]
    if has_dictionary:
        model = nnx.merge(graphdef, state["params"], confounders, frozen)
        model.update_confounders(biases)
        confounders = nnx.state(model, CONFOUNDERS)
    new_state = {
        "step": state["step"] + 1,
        "params": params,
        "opt_state": opt_state,
        "confounders": confounders,
    }
    if mesh is not None:
        layout = sharding.tree_shardings(new_state, mesh, fsdp_min_size)
        new_state = jax.lax.with_sharding_constraint(new_state, layout)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


train_step = jax.jit(
    _train_step,
    static_argnames=("graphdef", "tx", "kind", "accum_steps", "mesh", "fsdp_min_size"),
    donate_argnames=("state",),
)


class BoundTrainStep:
    """``train_step`` with its static arguments fixed, called on the state's leaves.

    The state and the frozen model are trees of ``nnx.Variable``, which JAX flattens and
    rebuilds in Python at every call: ~850 Variables flattened and ~590 rebuilt per step
    at the ``small`` benchmark preset; a call took 5.3 ms of Python that way, 1.3 ms on
    the leaves (BENCHMARKS.md). The training loop holds the state as this object's flat
    list of arrays instead (a list flattens in C++) and rebuilds the tree only to save or
    evaluate it.

    Args:
      state: the step's state (:func:`initial_state`'s tree), for its structure.
      frozen: the rest of the model (CLIP), kept here as leaves.
      **static: ``train_step``'s static arguments: ``graphdef``, ``tx``, ``kind``,
        ``accum_steps``, ``mesh``, ``fsdp_min_size``.
    """

    def __init__(self, state, frozen, **static):
        self._state_def = jax.tree.structure(state)
        frozen_leaves, frozen_def = jax.tree.flatten(frozen)
        self._frozen = frozen_leaves

        def step(leaves, frozen_leaves, batch, base_key):
            state = jax.tree.unflatten(self._state_def, leaves)
            frozen = jax.tree.unflatten(frozen_def, frozen_leaves)
            new_state, metrics = _train_step(state, frozen, batch, base_key, **static)
            new_leaves, new_def = jax.tree.flatten(new_state)
            if new_def != self._state_def:
                raise ValueError(f"the step changed the state's structure to {new_def}")
            return new_leaves, metrics

        self._step = jax.jit(step, donate_argnums=0)

    def leaves(self, state) -> list[jax.Array]:
        """The flat arrays of ``state``, as :meth:`__call__` takes and returns them."""
        return jax.tree.leaves(state)

    def state(self, leaves: list[jax.Array]):
        """The state tree of ``leaves`` (sharing their arrays)."""
        return jax.tree.unflatten(self._state_def, leaves)

    def __call__(self, leaves: list[jax.Array], batch, base_key):
        """One step: (the new state's leaves, ``{"loss", "grad_norm"}``); ``leaves`` are
        donated."""
        return self._step(leaves, self._frozen, batch, base_key)

    def lower(self, leaves: list[jax.Array], batch, base_key):
        """The step lowered for these arguments (``.compile()``, cost analysis)."""
        return self._step.lower(leaves, self._frozen, batch, base_key)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def clip_step(params, frozen, video, confounders=None, *, graphdef):
    """V_P [B, L, D] of uint8 ``video`` [B, L, H, W, 3], in the CLIP's dtype: the frozen
    part of the model, for the CLIP feature cache."""
    model = nnx.merge(graphdef, params, *([] if confounders is None else [confounders]), frozen)
    return model.clip_features(video)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_step(params, frozen, video, confounders=None, *, graphdef):
    """Logits [B, C]; multi-view video [B, V, L, H, W, 3] averages the V views' logits.

    ``confounders``: the state's TCI dictionary, for a model that has one."""
    model = nnx.merge(graphdef, params, *([] if confounders is None else [confounders]), frozen)
    if video.ndim == 6:
        b, v = video.shape[:2]
        logits, _ = model(video.reshape(b * v, *video.shape[2:]))
        return logits.reshape(b, v, -1).mean(axis=1)
    return model(video)[0]
