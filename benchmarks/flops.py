"""Matmul FLOPs of a JAX function, counted from its jaxpr (for MFU on any platform).

XLA's cost analysis of a compiled step is right on the CPU but not on a GPU, where dots
become cuBLAS or cuDNN library calls it does not count (``base()`` at L=8, B=2 on an
H200: 344 GFLOP, less than its CLIP forward alone). The jaxpr is the same computation
on every platform before any compiler sees it, so the count here is too:

* ``dot_general``: 2 x (output elements) x (contracted size);
* ``conv_general_dilated``: 2 x (output elements) x (kernel elements per output feature)
  / ``batch_group_count``;
* everything else (elementwise work, reductions) is not counted, as in MFU;
* sub-jaxprs are counted where they run: a ``scan`` body ``length`` times, the costliest
  branch of a ``cond``, a ``while`` body once (its trip count is not known when tracing),
  a rematerialised (``checkpoint``) block wherever the backward pass recomputes it, so a
  step with remat on counts the FLOPs it executes;
* cuDNN's fused attention (``model.attention`` "cudnn", or "auto" on a GPU), one
  primitive with no dot inside, is credited with the products of the attention it
  replaces: QK^T and PV forward, four products backward; the kernel's recomputation of
  QK^T in its backward pass is not counted. Tracing it needs no GPU.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core

# cuDNN attention primitives: matmuls of [B, T, N, H] queries against S keys per call.
_ATTENTION_PRODUCTS = {
    "dot_product_attention_fwd_wrapper": 2,
    "dot_product_attention_bwd_wrapper": 4,
}


def matmul_flops(fn, *args, **kwargs) -> int:
    """FLOPs of the dots and convolutions ``fn(*args, **kwargs)`` runs (traced, not run)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def dot_flops(out_shape, lhs_shape, lhs_contracting) -> int:
    """2 x (output elements) x (contracted size): the FLOPs of one dot product."""
    return 2 * _size(out_shape) * math.prod(lhs_shape[d] for d in lhs_contracting)


def jaxpr_flops(jaxpr: core.Jaxpr) -> int:
    """FLOPs of the dots and convolutions of one execution of ``jaxpr``."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += dot_flops(eqn.outvars[0].aval.shape, eqn.invars[0].aval.shape, contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            per_output = _size(rhs) // out_features // eqn.params["batch_group_count"]
            total += 2 * _size(eqn.outvars[0].aval.shape) * per_output
        elif name in _ATTENTION_PRODUCTS:
            q, k = (v.aval.shape for v in eqn.invars[:2])
            keys = k[1 if eqn.params["layout"] == 0 else 2]  # layout 0: [B, S, N, H]
            total += _ATTENTION_PRODUCTS[name] * 2 * _size(q) * keys
        elif "attention" in name:  # a fused kernel of another JAX version: not guessed
            raise ValueError(f"no FLOP count for the attention primitive {name!r}")
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            repeat = eqn.params["length"] if name == "scan" else 1
            for sub in _subjaxprs(eqn.params):
                total += repeat * jaxpr_flops(sub)
    return total


def _subjaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def _size(shape) -> int:
    return math.prod(shape)
