"""Where our training step's time goes on this machine, and what its matmuls cost alone.

Three tables for one preset (``benchmarks/presets.py``), for whoever makes the step faster:

* **Wall clock by op**: a ``jax.profiler`` trace of a few steps, joined to the compiled
  HLO by name. Each op's share of the step is its running time divided among the ops
  running at once (XLA's CPU runtime runs independent ops side by side), so the shares
  add up to the step's busy time. Ops are grouped by kind, and the fusions that hold a
  matmul by their products' shapes, with the rate each ran at. XLA's own (not library)
  dot ops run asynchronously, their spans covering their launch alone: such a row shows
  a rate above the peak, marked "(async)"; the last table times them.
* **The other ops by what they compute**: the ops without a product, grouped by kind,
  output shape and the JAX operation the compiled module's metadata names for them
  (``transpose(jvp())/transpose`` is a transpose of the backward pass), so that each
  row can be traced to the model code that makes it.
* **Matmuls alone**: every product of the compiled step (``dot`` instructions, fused or
  not) jitted alone on random operands of its shapes and timed, one at a time; their sum
  is a floor for the step on this machine: the time it would take were everything but
  the products free. The 2048 x 2048 float32 matmul of ``train_step.py`` is timed in the
  same process as the peak it is read against.

It runs as ``python -m cmdcl_jax.main`` runs a step on a CPU (``--reuse_cpu_scratch``);
on a GPU the trace names kernels, not HLO ops, and only the last table is meaningful.

  python benchmarks/step_profile.py --model_preset small
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_step  # noqa: E402 - beside this file, as the repository root is above
from flops import dot_flops  # noqa: E402
from presets import preset  # noqa: E402

from cmdcl_jax import host_memory  # noqa: E402

# Named apart from train_step's flags.
_MODEL = flags.DEFINE_string("model_preset", "small", "Model preset to profile.")
_TRACED = flags.DEFINE_integer("traced_steps", 3, "Steps traced.")
_ROWS = flags.DEFINE_integer("rows", 25, "Rows per table.")

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (.+?) (\w[\w-]*)\((.*)")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")
# Not ops of their own: values, views, and loops or calls whose ops appear in the trace.
_NOT_OPS = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) (?:\(|\{)")
_LAYOUT = re.compile(r"\{[\d,]*\}")
_SOURCE = re.compile(r'op_name="(?:jit\([^)]*\)/)?([^";]*)')


@dataclasses.dataclass(frozen=True)
class Dot:
    """One ``dot`` instruction: operand shapes and dimension numbers, as ``lax.dot_general``
    takes them, and its output shape."""

    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    contracting: tuple[tuple[int, ...], tuple[int, ...]]
    batch: tuple[tuple[int, ...], tuple[int, ...]]
    out: tuple[int, ...]

    @property
    def flops(self) -> int:
        return dot_flops(self.out, self.lhs, self.contracting[0])

    def __str__(self) -> str:
        (lc, rc), (lb, rb) = self.contracting, self.batch
        batch = f" batch {list(lb)}x{list(rb)}" if lb else ""
        return f"{list(self.lhs)} x {list(self.rhs)} contracting {list(lc)}x{list(rc)}{batch}"


def hlo_dots(hlo: str) -> dict[str, list[Dot]]:
    """The products each op of a compiled module's text runs: {op name: [Dot]}, for every
    ``dot`` instruction and fusion (ops without dots map to []; a loop's body once)."""
    shapes, in_computation, calls, ops = {}, collections.defaultdict(list), {}, []
    computation = None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        if array := _ARRAY.match(shape):
            shapes[name] = tuple(int(d) for d in array.group(1).split(",") if d)
        if opcode == "dot":
            lhs, rhs = re.match(r"%(\S+?), %(\S+?)\)", rest).groups()
            dims = _dims(rest, "contracting"), _dims(rest, "batch")
            dot = Dot(shapes[lhs], shapes[rhs], *dims, out=shapes[name])
            in_computation[computation].append(dot)
            ops.append((name, [dot], computation))
        elif opcode == "fusion":
            calls[name] = re.search(r"calls=%([\w.\-]+)", rest).group(1), computation
        elif opcode not in _NOT_OPS:
            ops.append((name, [], computation))
    fused = {callee for callee, _ in calls.values()}  # whose instructions are not ops
    out = {name: dots for name, dots, computation in ops if computation not in fused}
    for name, (callee, computation) in calls.items():
        if computation not in fused:
            out[name] = list(in_computation.get(callee, []))
    return out


def hlo_sources(hlo: str) -> dict[str, str]:
    """Each instruction's output shape and the JAX operation its metadata names, from a
    compiled module's text: {op name: "f32[128,2048] transpose(jvp())/transpose"}."""
    out = {}
    for line in hlo.splitlines():
        if m := _INSTRUCTION.match(line):
            source = _SOURCE.search(line)
            shape = _LAYOUT.sub("", m.group(2))
            out[m.group(1)] = f"{shape} {source.group(1) if source else ''}".rstrip()
    return out


def _dims(rest: str, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    def read(side):
        m = re.search(rf"{side}_{kind}_dims=\{{([\d,]*)\}}", rest)
        return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()

    return read("lhs"), read("rhs")


def wall_shares(events: list[dict], names) -> collections.Counter:
    """Microseconds of wall clock per op: trace events ("X", with ``ts`` and ``dur``) of
    the ops in ``names``, each instant divided equally among the ops running then."""
    edges = []
    for e in events:
        if e.get("ph") == "X" and e["name"] in names:
            edges += [(e["ts"], 1, e["name"]), (e["ts"] + e["dur"], -1, e["name"])]
    edges.sort(key=lambda edge: (edge[0], edge[1]))
    running, shares, last = collections.Counter(), collections.Counter(), None
    for t, change, name in edges:
        if running and last is not None:
            each = (t - last) / sum(running.values())
            for op, count in running.items():
                shares[op] += each * count
        running[name] += change
        if not running[name]:
            del running[name]
        last = t
    return shares


def time_alone(dot: Dot, calls: int = 20, repeats: int = 7) -> float:
    """Median seconds of ``dot`` jitted alone on random float32 operands."""
    rng = np.random.default_rng(0)
    lhs, rhs = (jax.device_put(rng.standard_normal(s, np.float32)) for s in (dot.lhs, dot.rhs))
    fn = jax.jit(lambda a, b: lax.dot_general(a, b, (dot.contracting, dot.batch)))
    jax.block_until_ready(fn(lhs, rhs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(lhs, rhs)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _kind(name: str, dots: list[Dot]) -> str:
    if dots:
        return " + ".join(str(d) for d in dots)
    return re.sub(r"\.\d+$", "", name)  # "transpose_copy_fusion.45" -> its kind


def main(argv):
    del argv
    host_memory.reuse_cpu_scratch()  # before the first computation starts the backend
    step = train_step.JaxStep(preset(_MODEL.value))
    hlo = step.step.lower(*step._args()).compile().as_text()
    ops = hlo_dots(hlo)
    step.run(2)
    ms = statistics.median(step.run(_TRACED.value) for _ in range(3)) * 1e3
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            step.run(_TRACED.value)
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    shares = wall_shares(events, ops)
    peak = train_step.matmul_rate("jax", "float32", gpu=False)
    print(f"{_MODEL.value}: {ms:.1f} ms/step untraced; matmul peak {peak / 1e9:.0f} GFLOP/s")

    by_kind = collections.defaultdict(lambda: [0.0, 0, 0])  # us per step, ops, FLOPs
    for name, us in shares.items():
        row = by_kind[_kind(name, ops[name])]
        row[0] += us / _TRACED.value
        row[1] += 1
        row[2] += sum(d.flops for d in ops[name])
    busy = sum(row[0] for row in by_kind.values()) / 1e3
    matmul = sum(row[0] for row in by_kind.values() if row[2]) / 1e3
    flops = sum(row[2] for row in by_kind.values())
    print(
        f"\nwall clock by op (traced): {busy:.1f} ms busy a step, {matmul:.1f} of it in ops with"
        f" products ({flops / 1e9:.2f} GFLOP at {flops / matmul / 1e6:.0f} GFLOP/s there)"
    )
    print("| ms/step | ops | GFLOP/s | kind |\n| --- | --- | --- | --- |")
    for kind, (us, count, fl) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])[: _ROWS.value]:
        rate = f"{fl / us / 1e3:.0f}" if fl else "-"
        if fl and fl / us * 1e6 > peak:  # more than the peak: timed its launch only
            rate += " (async)"
        print(f"| {us / 1e3:.2f} | {count} | {rate} | {kind} |")

    sources, by_source = hlo_sources(hlo), collections.defaultdict(lambda: [0.0, 0])
    for name, us in shares.items():
        if not ops[name]:
            row = by_source[f"{_kind(name, [])}: {sources[name]}"]
            row[0] += us / _TRACED.value
            row[1] += 1
    print("\nthe ops without products, by what they compute (traced)")
    print("| ms/step | ops | kind: output, JAX operation |\n| --- | --- | --- |")
    for what, (us, count) in sorted(by_source.items(), key=lambda kv: -kv[1][0])[: _ROWS.value]:
        print(f"| {us / 1e3:.2f} | {count} | {what} |")

    counts = collections.Counter(d for dots in ops.values() for d in dots)
    alone = {dot: time_alone(dot) for dot in counts}
    floor = sum(alone[d] * n for d, n in counts.items())
    total = sum(d.flops * n for d, n in counts.items())
    print(
        f"\nmatmuls alone: {sum(counts.values())} products, {total / 1e9:.2f} GFLOP in"
        f" {floor * 1e3:.1f} ms ({total / floor / 1e9:.0f} GFLOP/s, {total / floor / peak:.0%} of"
        f" the peak); in the step, {total / ms / 1e6:.0f} GFLOP/s ({total / ms * 1e3 / peak:.0%})"
    )
    print("| ms/step | count | GFLOP/s alone | product |\n| --- | --- | --- | --- |")
    rows = sorted(counts.items(), key=lambda kv: -alone[kv[0]] * kv[1])
    for dot, n in rows[: _ROWS.value]:
        print(f"| {alone[dot] * n * 1e3:.2f} | {n} | {dot.flops / alone[dot] / 1e9:.0f} | {dot} |")


if __name__ == "__main__":
    app.run(main)
