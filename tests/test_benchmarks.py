"""The benchmarks' own arithmetic and set-up, checked where no GPU is needed: the matmul
FLOP count behind MFU, the PyTorch twin's moving to a device as a whole, and the step
profiler's reading of compiled HLO and of trace spans."""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from flops import matmul_flops  # noqa: E402 - from the benchmarks directory


def test_counts_each_dot_and_convolution_by_its_shapes():
    a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))
    # a batched product: 2 x (3 x 4 x 6 outputs) x 5 contracted
    assert matmul_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 72 * 5

    image, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((2, 2, 3, 4))

    def patches(image, kernel):  # NHWC, 2x2 kernel of 3 -> 4 features, stride 2
        return lax.conv_general_dilated(
            image, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    # 2 x 4 x 4 x 4 outputs, each a sum of 2 x 2 x 3 products
    assert matmul_flops(patches, image, kernel) == 2 * 128 * 12


def test_counts_loops_branches_and_the_backward_pass():
    x, w = jnp.ones((4, 5)), jnp.ones((5, 5))
    one_dot = 2 * 4 * 5 * 5

    def scanned(x, w):
        return lax.scan(lambda c, _: (c @ w, None), x, None, length=3)[0]

    assert matmul_flops(scanned, x, w) == 3 * one_dot

    def branches(p, x, w):  # the costlier branch counts
        return lax.cond(p, lambda: x @ w @ w, lambda: x)

    assert matmul_flops(branches, True, x, w) == 2 * one_dot

    def loss(x, w):
        return jnp.sum(jnp.tanh(x @ w))

    # forward, then dL/dx and dL/dw: three products of the same size
    assert matmul_flops(jax.value_and_grad(loss, argnums=(0, 1)), x, w) == 3 * one_dot
    # rematerialised: the backward pass computes x @ w again
    remat = jax.value_and_grad(jax.checkpoint(loss), argnums=(0, 1))
    assert matmul_flops(remat, x, w) == 4 * one_dot


def test_cudnn_attention_is_credited_with_the_products_xla_attention_runs():
    """Traced on the CPU, never run: cuDNN's fused kernel is one primitive, counted as the
    two forward and four backward products of XLA's attention of the same shapes."""
    q = jnp.ones((2, 8, 4, 64), jnp.bfloat16)  # [B, T, N, H]
    kv = jnp.ones((2, 6, 4, 64), jnp.bfloat16)  # S = 6 keys
    product = 2 * q.size * 6

    def grads(implementation):
        def loss(q, k, v):
            out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
            return jnp.sum(out.astype(jnp.float32))

        return matmul_flops(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)

    assert grads("xla") == 6 * product
    assert grads("cudnn") == 6 * product


def test_an_attention_kernel_it_cannot_count_is_refused_not_counted_as_zero():
    kernel = core.Primitive("flash_attention_of_another_version")
    kernel.def_abstract_eval(lambda q: q)
    with pytest.raises(ValueError, match="flash_attention_of_another_version"):
        matmul_flops(kernel.bind, jnp.ones((2, 8, 4, 64)))


def test_the_torch_twin_moves_to_another_device_whole():
    """``.to(device)`` must carry every tensor the twin's forward uses: on a GPU, one left
    behind failed the benchmark ("found at least two devices, cuda:0 and cpu"). The meta
    device shows the same failure without a GPU."""
    import torch
    from presets import preset
    from torch_twin import TorchCMDCL

    tiny = preset("tiny")
    twin = TorchCMDCL(tiny.build(0), tiny.arch).to("meta")
    video = torch.from_numpy(np.asarray(tiny.batch(0)["video"])).to("meta")
    logits = twin(video)
    assert logits.device.type == "meta"
    assert logits.shape == (tiny.batch_size, tiny.num_classes)


def test_step_profile_reads_the_products_of_compiled_hlo():
    """``step_profile.hlo_dots`` finds every product of a compiled module, fused or not,
    with the shapes and dimension numbers that rebuild it: its FLOPs equal the jaxpr's."""
    from step_profile import hlo_dots

    def fn(a, b, c, d):  # a plain and a batched product, with elementwise work around
        return jnp.tanh(a @ b).sum() + jnp.einsum("bij,bjk->bik", c * 2, d).sum()

    args = jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((3, 5, 6)), jnp.ones((3, 6, 7))
    ops = hlo_dots(jax.jit(fn).lower(*args).compile().as_text())
    dots = [d for found in ops.values() for d in found]
    assert sorted(d.flops for d in dots) == sorted([2 * 8 * 4 * 16, 2 * 3 * 5 * 7 * 6])
    assert sum(d.flops for d in dots) == matmul_flops(fn, *args)
    for d in dots:  # each rebuilt alone gives its output's size
        lhs, rhs = jnp.ones(d.lhs), jnp.ones(d.rhs)
        out = lax.dot_general(lhs, rhs, (d.contracting, d.batch))
        contracted = np.prod([d.lhs[i] for i in d.contracting[0]])
        assert 2 * out.size * contracted == d.flops


def test_step_profile_names_each_op_by_its_output_and_jax_operation():
    from step_profile import hlo_dots, hlo_sources

    def fn(x):  # a transposed copy of the input, scaled: one op without a product
        return jnp.transpose(x) * 2.0

    hlo = jax.jit(fn).lower(jnp.ones((4, 8))).compile().as_text()
    ops, sources = hlo_dots(hlo), hlo_sources(hlo)
    named = [sources[name] for name in ops]
    assert len(named) == 1 and named[0].startswith("f32[8,4] "), named
    assert re.search(r"mul|transpose", named[0]), named


def test_step_profile_divides_overlapping_time_among_the_ops_running():
    from step_profile import wall_shares

    events = [
        {"ph": "X", "name": "a", "ts": 0, "dur": 10},
        {"ph": "X", "name": "b", "ts": 5, "dur": 10},  # with a over [5, 10)
        {"ph": "X", "name": "other", "ts": 0, "dur": 100},  # not an op of the module
        {"ph": "i", "name": "a", "ts": 50},  # an instant, not a span
    ]
    shares = wall_shares(events, {"a", "b"})
    assert shares == {"a": 5 + 2.5, "b": 2.5 + 5}


def test_contenders_run_beside_ours_as_many_at_a_time_as_memory_holds():
    from train_step import MEMORY_MARGIN, groups_beside_ours

    gib = 2**30
    others = ["torch_eager", "torch_compile", "jax@before"]
    # base on a 24 GiB CPU host: ours holds ~8.7 GiB, ~14.5 GiB left: one beside it.
    assert groups_beside_ours(others, int(8.7 * gib), int(14.5 * gib)) == [[o] for o in others]
    # small: ~1.5 GiB each, all at once.
    assert groups_beside_ours(others, int(1.5 * gib), 20 * gib) == [others]
    # Room for two at the margin, not quite for three.
    ours = 4 * gib
    assert groups_beside_ours(others, ours, int(3 * MEMORY_MARGIN * ours) - 1) == [
        others[:2],
        others[2:],
    ]
    assert groups_beside_ours(others, ours, 1) == [[o] for o in others]  # never none at all
    assert groups_beside_ours(others, ours, None) == [others]  # memory unknown: as before
    assert groups_beside_ours([], ours, gib) == [[]]  # ours alone
