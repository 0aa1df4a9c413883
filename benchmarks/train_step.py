r"""Benchmark: one training step of CMDCL here against its PyTorch twin, eager and compiled.

Each contender is a separate warm process (built and compiled, then two steps run) that
runs ``--steps`` training steps when asked; the contenders take turns, one at a time (the
order rotates every round), for ``--rounds`` rounds, so a machine shared with other work
slows them alike. Our first contender starts alone; the others start side by side once
it is ready, as many at a time as the host's available memory holds at its size (each
``base`` process holds ~9 GB on a CPU: a 24 GiB machine takes one beside ours, so each
runs its rounds against ours in turn, one table per group).
Reported per contender: the median ms/step and clips/s, the median over rounds of its
time over ours in the same round, achieved FLOP/s (the matmul FLOPs of our step counted
from its jaxpr by ``flops.py``, the same model on both sides; XLA's cost analysis, which
misses the library calls of a GPU, is printed beside) against the fastest of a large
matmul measured by each library in the same rounds (on a GPU, against the card's peak:
MFU), its process's peak memory, its minor page faults per step (a step that maps
its scratch anew shows tens of thousands) and the cores it kept busy while stepping (CPU
time over wall time; a thread that spins while it waits counts as busy). The load
average is printed before and after.

  python benchmarks/train_step.py                      # tiny, small, base (~10 min, 2 cores)
  python benchmarks/train_step.py --quick              # tiny and small, 3 rounds
  python benchmarks/train_step.py --presets small --attention default,explicit
  python benchmarks/train_step.py --presets base --dtype bfloat16 --attention cudnn,xla

``--checkout DIR`` adds each of our contenders as another checkout of this repository
computes it (this worker on that checkout's ``cmdcl_jax``), to measure a change in one
interleaved run.
``--attention`` adds one contender per TimeSformer attention implementation (for each of
our contenders);
``--contenders``: ``jax_reuse_scratch`` (the default's first, ours) is our step in a
process set up as ``main.py`` sets it up on a CPU by default (``--reuse_cpu_scratch``,
``cmdcl_jax.host_memory``); ``jax`` is a process with JAX's own dispatch
(``--noreuse_cpu_scratch``); ``jax_clip_cache`` our step fed the frozen CLIP's features
(``train.clip_cache``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

_PRESETS = flags.DEFINE_list("presets", ["tiny", "small", "base"], "Model presets to time.")
_CONTENDERS = flags.DEFINE_list(
    "contenders",
    ["jax_reuse_scratch", "torch_eager", "torch_compile"],
    "Who runs the step (the first is ours, the reference of every ratio).",
)
_CHECKOUT = flags.DEFINE_multi_string(
    "checkout",
    [],
    "Another checkout whose steps join the contenders as <our contender>@<dir name>.",
)
_ROUNDS = flags.DEFINE_integer("rounds", 0, "Rounds (0: 8 per preset, 3 for base).")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per contender per round (0: per preset).")
_QUICK = flags.DEFINE_bool("quick", False, "A first look: tiny and small, 3 rounds.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_ATTENTION = flags.DEFINE_list(
    "attention",
    ["default"],
    "Our TimeSformer attention implementations (model.attention), "
    "one contender each; 'default' leaves the config's.",
)
_FRAMES = flags.DEFINE_integer("frames", 0, "Clip length L (0: the preset's).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Batch B (0: the preset's).")
_REMAT = flags.DEFINE_bool(
    "remat", False, "Our TimeSformer blocks rematerialised (model.remat; the twin ignores it)."
)
_OUT = flags.DEFINE_string("out", "", "Also write the results here as JSON.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run as this contender's process.")
_PRESET = flags.DEFINE_string("preset", "", "Internal: the worker's preset.")

STEPS = {"tiny": 20, "small": 5, "base": 1}  # per contender per round
ROUNDS = {"tiny": 8, "small": 8, "base": 3}
MARK = "@@ "  # prefixes the worker's replies on stdout; anything else there is library noise
# Dense bfloat16 peak FLOP/s of accelerators (vendor data sheets, SXM parts), for MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}


# ----------------------------------------------------------------------------- workers


def matmul_rate(library: str, dtype: str, gpu: bool) -> float:
    """FLOP/s of one large square matmul (median of 3), in ``library``."""
    n = 8192 if gpu else 2048
    times = []
    if library == "jax":
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), dtype) / n
        dot = jax.jit(jnp.dot)
        dot(a, a).block_until_ready()
        for _ in range(3):
            start = time.perf_counter()
            dot(a, a).block_until_ready()
            times.append(time.perf_counter() - start)
    else:
        import torch

        device = "cuda" if gpu else "cpu"
        a = torch.ones((n, n), dtype=getattr(torch, dtype), device=device) / n
        torch.mm(a, a)
        for _ in range(3):
            _sync(gpu)
            start = time.perf_counter()
            torch.mm(a, a)
            _sync(gpu)
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def _sync(gpu: bool) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


class JaxStep:
    """Our train step, called as ``cmdcl_jax.train.loop`` calls it."""

    library = "jax"

    def __init__(self, preset, seed: int = 0, clip_cache: bool = False):
        import jax
        import optax
        from flax import nnx
        from flops import matmul_flops

        from cmdcl_jax import sharding
        from cmdcl_jax.models.cmdcl import CONFOUNDERS, TRAINABLE
        from cmdcl_jax.train import steps

        self.jax, self.sharding = jax, sharding
        self.gpu = jax.default_backend() == "gpu"
        model = preset.build(seed)
        graphdef, params, confounders, frozen = nnx.split(model, TRAINABLE, CONFOUNDERS, ...)
        # The training loop's optimizer (setup.make_optimizer) at a constant learning rate;
        # setup itself is not imported, so the worker runs without the data stack.
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4))
        self.mesh = sharding.make_mesh(devices=jax.devices()[:1])
        state = steps.initial_state(params, confounders, tx)
        self.state = jax.device_put(state, sharding.tree_shardings(state, self.mesh))
        self.frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, self.mesh))
        self.batch, self.key = preset.batch(seed), jax.random.key(seed)
        if clip_cache:  # train.clip_cache: V_P computed once, then fed with the batch
            v_p = steps.clip_step(
                self.state["params"],
                self.frozen,
                jax.device_put(self.batch["video"]),
                self.state["confounders"],
                graphdef=graphdef,
            )
            self.batch = {**self.batch, "frames_clip": jax.device_get(v_p)}
        statics = dict(graphdef=graphdef, tx=tx, kind="single", accum_steps=1, mesh=self.mesh)
        self.step, self.state = _loop_step(steps, self.state, self.frozen, statics)
        try:
            self.flops = matmul_flops(self.step, *self._args())
        except ValueError as err:  # a fused kernel it cannot count: no MFU, not a wrong one
            print(f"no matmul FLOP count: {err}", file=sys.stderr, flush=True)
            self.flops = None
        start = time.perf_counter()
        compiled = self.step.lower(*self._args()).compile()
        self.compile_s = time.perf_counter() - start
        self.xla_flops = _cost(compiled.cost_analysis(), "flops")

    def _args(self):
        placed = self.sharding.place_batch(self.batch, self.mesh)
        return self.state, placed, self.key

    def run(self, n: int) -> float:
        """Seconds per step over ``n`` steps."""
        start = time.perf_counter()
        for _ in range(n):
            self.state, metrics = self.step(*self._args())
        self.jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / n

    def pick_threads(self) -> None:
        """XLA's thread pool is fixed when the backend starts: nothing to pick."""

    def peak_memory(self) -> int | None:
        if not self.gpu:
            return None
        return self.jax.devices()[0].memory_stats().get("peak_bytes_in_use")


def _loop_step(steps, state, frozen, statics: dict):
    """(step, what it carries): the step as the training loop of the checkout under test
    calls it, ``step(carried, batch, key) -> (carried, metrics)``; a checkout from before
    ``BoundTrainStep`` carries the state tree and passes the frozen model at each call."""
    if hasattr(steps, "BoundTrainStep"):
        bound = steps.BoundTrainStep(state, frozen, **statics)
        return bound, bound.leaves(state)
    return _TreeStep(steps.bind_train_step(**statics), frozen), state


class _TreeStep:
    """``bind_train_step``'s function with the frozen model bound."""

    def __init__(self, jitted, frozen):
        self.jitted, self.frozen = jitted, frozen

    def __call__(self, state, batch, key):
        return self.jitted(state, self.frozen, batch, key)

    def lower(self, state, batch, key):
        return self.jitted.lower(state, self.frozen, batch, key)


def _cost(analysis, key: str) -> float | None:
    """A figure of XLA's cost analysis (a dict, or a list of one dict in older JAX)."""
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return (analysis or {}).get(key)


class TorchStep:
    """The twin's step: forward, cross-entropy, backward, clip to norm 1, Adam."""

    library = "torch"

    def __init__(self, preset, *, compiled: bool, seed: int = 0):
        import torch
        from torch.nn import functional as F
        from torch_twin import TorchCMDCL, twin_parameters

        self.torch = torch
        self.gpu = torch.cuda.is_available()
        self.device = "cuda" if self.gpu else "cpu"
        self.autocast = preset.cfg.dtype == "bfloat16"
        twin = TorchCMDCL(preset.build(seed), preset.arch)
        kept = twin_parameters(twin)
        for name, p in twin.named_parameters():
            p.requires_grad_(name in kept and p.requires_grad)
        self.params = [p for p in twin.parameters() if p.requires_grad]
        self.twin = twin.to(self.device).train()
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4)

        def loss_fn(video, label):
            with torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
                return F.cross_entropy(self.twin(video).float(), label)

        batch = preset.batch(seed)
        self.video = torch.from_numpy(batch["video"])
        self.label = torch.from_numpy(batch["label"]).long()
        self.loss_fn = torch.compile(loss_fn) if compiled else loss_fn
        start = time.perf_counter()
        self.run(1)  # compiles, when compiled
        self.compile_s = time.perf_counter() - start
        self.flops = self.xla_flops = None

    def pick_threads(self) -> int | None:
        """Sets and returns the faster of 1 and all intra-op threads (None on a GPU).

        On a loaded machine, torch's OpenMP threads wait for each other at every op (the
        tiny step runs 5-10x slower on 2 threads than on 1 at load average 6); one thread
        then wins, and the twin is timed at its best. Asked once every contender is ready,
        one worker at a time, so the others' compilation does not pick for it.
        """
        torch = self.torch
        if self.gpu:
            return None
        candidates = sorted({1, torch.get_num_threads()})
        if self.run(1) > 2.0:  # a large step: all threads, and no time spent trying
            return torch.get_num_threads()
        times = {n: [] for n in candidates}
        for _ in range(3):
            for n in candidates:
                torch.set_num_threads(n)
                times[n].append(self.run(1))
        best = min(candidates, key=lambda n: statistics.median(times[n]))
        torch.set_num_threads(best)
        return best

    def run(self, n: int) -> float:
        torch = self.torch
        _sync(self.gpu)
        start = time.perf_counter()
        for _ in range(n):
            video = self.video.to(self.device, non_blocking=True)
            label = self.label.to(self.device, non_blocking=True)
            loss = self.loss_fn(video, label)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        _sync(self.gpu)
        return (time.perf_counter() - start) / n

    def peak_memory(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.gpu else None


def make_step(contender: str, preset):
    if contender in ("jax", "jax_clip_cache", "jax_reuse_scratch"):
        return JaxStep(preset, clip_cache=contender == "jax_clip_cache")
    if contender in ("torch_eager", "torch_compile"):
        return TorchStep(preset, compiled=contender == "torch_compile")
    raise ValueError(
        f"contender {contender!r} not one of jax, jax_clip_cache, jax_reuse_scratch, "
        "torch_eager, torch_compile"
    )


def serve(contender: str, preset_name: str, dtype: str, attention: str) -> None:
    """The worker: builds, warms up, then answers one JSON command per stdin line."""
    from presets import preset

    p = preset(preset_name).with_dtype(dtype).resized(_FRAMES.value, _BATCH.value)
    if attention != "default":
        p = dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, attention=attention))
    if _REMAT.value:
        p = dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, remat=True))
    step = make_step(contender, p)
    step.run(2)
    _reply(
        ready=True,
        peak_rss=_peak_rss(),
        flops=step.flops,
        xla_flops=step.xla_flops,
        compile_s=step.compile_s,
        batch_size=p.batch_size,
        frames=p.num_frames,
        frame_size=p.frame_size,
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "steps":
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            seconds = step.run(cmd["n"])
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            faults = (after.ru_minflt - before.ru_minflt) / cmd["n"]
            _reply(seconds=seconds, faults_per_step=faults, cores_busy=cpu / wall)
        elif cmd["cmd"] == "threads":
            _reply(threads=step.pick_threads())
        elif cmd["cmd"] == "matmul":
            _reply(flops_per_s=matmul_rate(step.library, dtype, step.gpu))
        elif cmd["cmd"] in ("report", "quit"):
            _reply(
                peak_rss=_peak_rss(), peak_device=step.peak_memory(), gpu=step.gpu, device=_device()
            )
            if cmd["cmd"] == "quit":
                return


def _peak_rss() -> int:
    """This process's peak resident size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device() -> str:
    import jax

    return str(jax.devices()[0].device_kind)


def _reply(**values) -> None:
    print(MARK + json.dumps(values), flush=True)


# ----------------------------------------------------------------------------- orchestrator


class Worker:
    """A contender's process and its command channel."""

    def __init__(self, name: str, checkout: Path, argv: list[str], log: Path):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env={**os.environ, "PYTHONPATH": str(checkout)},
        )

    def ask(self, **cmd) -> dict:
        if cmd:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        tail = self.log.read_text()[-3000:]
        raise RuntimeError(f"{self.name} exited ({self.proc.wait()}); its log {self.log}:\n{tail}")


def contenders(root: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, checkout whose ``cmdcl_jax`` it imports, worker flags) of every contender."""
    out = []
    for c in _CONTENDERS.value:
        if c.startswith("jax"):
            for attention in _ATTENTION.value:
                name = c if attention == "default" else f"{c}[{attention}]"
                out.append((name, root, ["--worker", c, "--attention", attention]))
        else:
            out.append((c, root, ["--worker", c]))
    for checkout in _CHECKOUT.value:
        path = Path(checkout).resolve()
        for c in _CONTENDERS.value:
            if c.startswith("jax"):
                out.append((f"{c}@{path.name}", path, ["--worker", c]))
    return out


# Room left per process beside ours: the others' sizes are taken as ours times this.
MEMORY_MARGIN = 1.2


def available_memory() -> int | None:
    """Bytes the host can still give processes (``MemAvailable``); None where unknown."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def groups_beside_ours(others: list, ours_bytes: int, available: int | None) -> list[list]:
    """``others`` in groups to run beside our running contender, each group as many as
    ``available`` bytes hold at ``MEMORY_MARGIN`` times our size (at least one); all in
    one group where the memory is unknown."""
    if available is None:
        room = len(others)
    else:
        room = max(1, int(available // (MEMORY_MARGIN * ours_bytes)))
    return [others[i : i + room] for i in range(0, len(others), room)] or [[]]


def bench_preset(name: str, root: Path, logs: Path) -> list[dict]:
    """One result per group of contenders run beside ours (one group where memory allows)."""
    steps = _STEPS.value or STEPS[name]
    rounds = _ROUNDS.value or (3 if _QUICK.value else ROUNDS[name])
    load_before = os.getloadavg()
    print(f"\n## {name} ({_DTYPE.value}): load average {_load(load_before)}", flush=True)
    info = {}  # per contender: what it replied when ready

    def start(specs) -> list[Worker]:  # they build and compile side by side
        workers = []
        for cname, checkout, argv in specs:
            flags_ = [*argv, "--preset", name, "--dtype", _DTYPE.value]
            flags_ += [f"--frames={_FRAMES.value}", f"--batch_size={_BATCH.value}"]
            flags_ += [f"--remat={_REMAT.value}"]
            workers.append(Worker(cname, checkout, flags_, logs / f"{name}-{cname}.log"))
        print(f"starting {', '.join(w.name for w in workers)} ...", flush=True)
        for w in workers:
            info[w.name] = w.ask()
            print(f"  {w.name} ready, compiled in {info[w.name]['compile_s']:.1f} s", flush=True)
        return workers

    first, *others = contenders(root)
    (ours,) = start([first])
    available = available_memory()
    groups = groups_beside_ours(others, info[ours.name]["peak_rss"], available)
    if len(groups) > 1:
        print(
            f"{ours.name} holds {info[ours.name]['peak_rss'] / 2**30:.1f} GiB with"
            f" {available / 2**30:.1f} GiB available: {len(groups[0])} contender(s) beside"
            " it at a time",
            flush=True,
        )
    results = []
    for group in groups:
        workers = [ours, *start(group)]
        results.append(run_rounds(name, workers, info, steps, rounds, load_before))
        for w in workers[1:]:
            w.ask(cmd="quit")
            w.proc.wait()
        load_before = os.getloadavg()
    ours.ask(cmd="quit")
    ours.proc.wait()
    return results


def run_rounds(name, workers, info, steps: int, rounds: int, load_before) -> dict:
    """``rounds`` rounds of ``steps`` steps of each of ``workers`` (ready), in turn."""
    for w in workers:  # one at a time, the others idle
        info[w.name]["threads"] = w.ask(cmd="threads")["threads"]
    times = {w.name: [] for w in workers}
    faults = {w.name: [] for w in workers}
    busy = {w.name: [] for w in workers}
    matmul = {w.name: [] for w in workers}
    for r in range(rounds):
        order = workers[r % len(workers) :] + workers[: r % len(workers)]
        for w in order:
            reply = w.ask(cmd="steps", n=steps)
            times[w.name].append(reply["seconds"])
            faults[w.name].append(reply["faults_per_step"])
            busy[w.name].append(reply["cores_busy"])
            matmul[w.name].append(w.ask(cmd="matmul")["flops_per_s"])
        line = ", ".join(f"{w.name} {1e3 * times[w.name][-1]:.1f}" for w in workers)
        print(f"round {r + 1}/{rounds} ms/step: {line}", flush=True)
    final = {w.name: w.ask(cmd="report") for w in workers}
    usage = {"faults": faults, "busy": busy}
    return _summarise(name, workers, info, times, usage, matmul, final, load_before)


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _summarise(name, workers, info, times, usage, matmul, final, load_before) -> dict:
    """``usage``: per contender and round, minor page faults per step ("faults") and CPU
    time over wall time while stepping ("busy": threads that spin while waiting count)."""
    ours = workers[0].name
    shape = info[ours]
    flops = next((i["flops"] for i in info.values() if i.get("flops")), None)
    xla_flops = next((i["xla_flops"] for i in info.values() if i.get("xla_flops")), None)
    gpu = any(f["gpu"] for f in final.values())
    peak = max(statistics.median(m) for m in matmul.values())
    card = next(iter(final.values()))["device"]
    card_peak = next((v for k, v in PEAK_BF16.items() if k in card), None) if gpu else None
    rows = []
    for w in workers:
        t = statistics.median(times[w.name])
        ratio = statistics.median(a / b for a, b in zip(times[w.name], times[ours], strict=True))
        rate = flops / t if flops else None
        rows.append(
            {
                "contender": w.name,
                "ms_per_step": 1e3 * t,
                "clips_per_s": shape["batch_size"] / t,
                "time_vs_ours": ratio,
                "flops_per_s": rate,
                "of_matmul_peak": rate / peak if rate else None,
                "mfu": rate / card_peak if rate and card_peak else None,
                "peak_rss_mib": final[w.name]["peak_rss"] / 2**20,
                "peak_device_mib": (final[w.name]["peak_device"] or 0) / 2**20 or None,
                "compile_s": info[w.name]["compile_s"],
                "torch_threads": info[w.name].get("threads"),
                "ms_per_round": [1e3 * x for x in times[w.name]],
                "page_faults_per_step": statistics.median(usage["faults"][w.name]),
                "page_faults_per_round": usage["faults"][w.name],
                "cores_busy": statistics.median(usage["busy"][w.name]),
                "cores_busy_per_round": usage["busy"][w.name],
            }
        )
    result = {
        "preset": name,
        "dtype": _DTYPE.value,
        "remat": _REMAT.value,
        "batch_size": shape["batch_size"],
        "frames": shape["frames"],
        "frame_size": shape["frame_size"],
        "flops_per_step": flops,
        "xla_flops_per_step": xla_flops,
        "matmul_peak_flops_per_s": {w.name: statistics.median(matmul[w.name]) for w in workers},
        "device": card,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rows": rows,
    }
    print_table(result)
    return result


def _giga(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def print_table(result: dict) -> None:
    peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in result["matmul_peak_flops_per_s"].items())
    flops, xla = result["flops_per_step"], result["xla_flops_per_step"]
    print(
        f"\n{result['preset']}: B={result['batch_size']}, L={result['frames']}, "
        f"{result['frame_size']} px, {result['dtype']}{', remat' * result['remat']}, "
        f"{result['device']}; "
        f"{_giga(flops)} GFLOP/step in matmuls (XLA's cost analysis: {_giga(xla)}); "
        f"matmul GFLOP/s: {peaks}; "
        f"load average {_load(result['load_before'])} -> {_load(result['load_after'])}"
    )
    mfu = any(r["mfu"] for r in result["rows"])
    head = "| contender | ms/step | clips/s | time vs ours | GFLOP/s | % of matmul peak |"
    head += " MFU |" if mfu else ""
    device_memory = any(r["peak_device_mib"] for r in result["rows"])
    head += " peak RSS MiB |" + (" peak device MiB |" if device_memory else "")
    head += " page faults/step | cores busy | compile s |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in result["rows"]:
        threads = r["torch_threads"]
        cells = [
            r["contender"] + (f" ({threads} thread{'s' * (threads > 1)})" if threads else ""),
            f"{r['ms_per_step']:.1f}",
            f"{r['clips_per_s']:.2f}",
            f"{r['time_vs_ours']:.2f}",
            f"{r['flops_per_s'] / 1e9:.1f}" if r["flops_per_s"] else "-",
            f"{100 * r['of_matmul_peak']:.0f}" if r["of_matmul_peak"] else "-",
        ]
        if mfu:
            cells.append(f"{100 * r['mfu']:.1f} %" if r["mfu"] else "-")
        cells.append(f"{r['peak_rss_mib']:.0f}")
        if device_memory:
            cells.append(f"{r['peak_device_mib']:.0f}" if r["peak_device_mib"] else "-")
        cells.append(f"{r['page_faults_per_step']:.0f}")
        cells.append(f"{r['cores_busy']:.2f}")
        cells.append(f"{r['compile_s']:.1f}")
        print("| " + " | ".join(cells) + " |")


def main(argv) -> None:
    del argv
    sys.path.insert(0, str(Path(__file__).parent))
    if _WORKER.value:
        from cmdcl_jax import cli

        cli.quiet_logs()
        if _WORKER.value == "jax_reuse_scratch":  # as main.py does on a CPU
            from cmdcl_jax import host_memory

            host_memory.reuse_cpu_scratch()
        serve(_WORKER.value, _PRESET.value, _DTYPE.value, _ATTENTION.value[0])
        return
    root = Path(__file__).resolve().parents[1]
    presets = ["tiny", "small"] if _QUICK.value else _PRESETS.value
    results = []
    with tempfile.TemporaryDirectory() as logs:
        for name in presets:
            results += bench_preset(name, root, Path(logs))
            if _OUT.value:  # after every preset: a later failure loses nothing measured
                Path(_OUT.value).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
