"""Reading Hugging Face checkpoints (config.json + safetensors) into NNX modules.

A checkpoint source is a local directory written by ``save_pretrained`` or a Hugging Face
model id (fetched into the local hub cache; offline machines must pass a directory).
Tensors are read one at a time with ``safetensors`` (numpy): no PyTorch at run time, and
the peak memory of a load is the model plus one tensor. A legacy ``pytorch_model.bin`` is
read (whole) only where PyTorch happens to be installed.

Each model file declares a table of rules ``(hf_key_regex, module_path_template, transform)``.
:func:`load_module` fills every ``nnx.Param`` of the module from the tensors the rules
match and raises :class:`WeightLoadError` naming the file and parameter at fault when a
parameter finds no tensor or a shape disagrees: no parameter is left silently random.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]
Rule = tuple[str, str, Transform]
Tensors = dict[str, tuple[Callable[[], np.ndarray], Path]]  # key -> (read it, its file)
Place = Callable[[tuple[int, ...]], jax.sharding.Sharding]  # parameter shape -> sharding


class WeightLoadError(ValueError):
    """A checkpoint that does not fit the module it is loaded into."""


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(x: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Linear.weight`` [out, in] -> NNX ``Linear.kernel`` [in, out]."""
    return x.T


def conv2d(x: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Conv2d.weight`` [out, in, kh, kw] -> NNX ``Conv.kernel`` [kh, kw, in, out]."""
    return x.transpose(2, 3, 1, 0)


def conv2d_to_torch(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`conv2d`: [kh, kw, in, out] -> [out, in, kh, kw]."""
    return x.transpose(3, 2, 0, 1)


# The transform that undoes each invertible one, for :func:`export_params`.
INVERSES: dict[Transform, Transform] = {identity: identity, linear: linear, conv2d: conv2d_to_torch}


def flatten(x: np.ndarray) -> np.ndarray:
    """Drops leading singleton axes: a [1, 1, D] token or [1, N, D] table -> [D] / [N, D]."""
    while x.ndim > 1 and x.shape[0] == 1:
        x = x[0]
    return x


def dense_rules(hf: str, ours: str) -> list[Rule]:
    """Rules for a PyTorch ``nn.Linear`` at key ``hf`` (a regex) -> ``nnx.Linear`` ``ours``."""
    return [
        (rf"{hf}\.weight", f"{ours}.kernel", linear),
        (rf"{hf}\.bias", f"{ours}.bias", identity),
    ]


def norm_rules(hf: str, ours: str) -> list[Rule]:
    """Rules for a PyTorch ``nn.LayerNorm`` at key ``hf`` -> ``nnx.LayerNorm`` ``ours``."""
    return [
        (rf"{hf}\.weight", f"{ours}.scale", identity),
        (rf"{hf}\.bias", f"{ours}.bias", identity),
    ]


def resolve(source: str | os.PathLike) -> Path:
    """Returns the local directory of a checkpoint given as a directory or a hub model id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise WeightLoadError(f"{source}: not a checkpoint directory")
    from huggingface_hub import snapshot_download  # imported late: only for hub ids

    try:
        return Path(
            snapshot_download(
                str(source), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
            )
        )
    except Exception as err:  # noqa: BLE001 - any hub failure gets the same advice
        raise WeightLoadError(
            f"{source}: not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(err).__name__}: {err}). On an offline machine, pass the directory "
            "that `save_pretrained` wrote."
        ) from err


def read_config(directory: Path, model_types: Sequence[str]) -> dict:
    """Reads ``config.json`` and checks its ``model_type`` is one of ``model_types``."""
    file = directory / "config.json"
    if not file.is_file():
        raise WeightLoadError(f"{file}: missing; a checkpoint directory needs its config.json")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise WeightLoadError(f"{file}: not valid JSON ({err})") from err
    found = config.get("model_type")
    if found not in model_types:
        raise WeightLoadError(
            f"{file}: model_type {found!r} is another architecture; expected one of "
            f"{list(model_types)}"
        )
    return config


def read_preprocessor(directory: Path) -> dict | None:
    """``preprocessor_config.json`` (image mean/std) of a checkpoint, or None if absent."""
    file = directory / "preprocessor_config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def read_tensors(directory: Path) -> Tensors:
    """Indexes every tensor of a checkpoint directory as ``{key: (read, file)}``.

    Safetensors files are opened for their headers only; ``read()`` then loads its one
    tensor, so a checkpoint is never held whole in memory.
    """
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [directory / f for f in files]
    elif (directory / "model.safetensors").is_file():
        paths = [directory / "model.safetensors"]
    elif (directory / "pytorch_model.bin").is_file():
        return _read_torch_bin(directory / "pytorch_model.bin")
    else:
        raise WeightLoadError(
            f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    tensors = {}
    for path in paths:
        if not path.is_file():
            raise WeightLoadError(f"{path}: listed in {index.name} but missing")
        try:
            with safe_open(str(path), framework="np") as f:
                keys = list(f.keys())
        except Exception as err:  # noqa: BLE001 - a corrupt file, whatever the parser says
            raise WeightLoadError(f"{path}: unreadable safetensors file ({err})") from err
        tensors.update({k: (functools.partial(_read_safetensor, path, k), path) for k in keys})
    return tensors


def _read_safetensor(path: Path, key: str) -> np.ndarray:
    """One tensor of a safetensors file. The file is opened (memory-mapped) for this
    tensor alone, so the pages read are released with it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return f.get_tensor(key)
    except Exception as err:  # noqa: BLE001 - a corrupt file, whatever the parser says
        raise WeightLoadError(f"{path}: tensor {key!r} unreadable ({err})") from err


def _read_torch_bin(path: Path) -> dict[str, tuple[np.ndarray, Path]]:
    try:
        import torch
    except ImportError as err:
        raise WeightLoadError(
            f"{path}: a PyTorch pickle needs PyTorch to read. Install torch, or convert it once "
            "to safetensors (load it with transformers and call save_pretrained)."
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (functools.partial(_float32_numpy, v), path) for k, v in state.items()}


def _float32_numpy(tensor) -> np.ndarray:
    """A PyTorch tensor as a float32 numpy array."""
    return tensor.float().numpy()


def param_paths(module: nnx.Module) -> dict[str, nnx.Param]:
    """Every ``nnx.Param`` of ``module`` by dotted path (``layers.0.attn.query.kernel``)."""
    return {
        ".".join(map(str, path)): node
        for path, node in nnx.iter_graph(module)
        if isinstance(node, nnx.Param)
    }


def load_module(
    make: Callable[[], nnx.Module],
    tensors: Tensors,
    rules: Sequence[Rule],
    *,
    source: str,
    place: Place | None = None,
) -> nnx.Module:
    """Builds ``make()`` without initialising it and fills every parameter from ``tensors``.

    The module is traced with ``nnx.eval_shape`` (no parameter storage); each tensor is
    then read, converted and put in place one at a time, on ``place(shape)`` when given
    (each device gets only its shard) or on the default device. A tensor key is matched
    against ``rules`` in order (``re.fullmatch``); the first match names the target
    parameter (``match.expand(template)``) and the transform to apply. Tensors no rule
    matches are not read (other towers, buffers).

    Raises:
      WeightLoadError: a rule names a parameter the module lacks, a shape disagrees, or a
        parameter of the module is not filled. The message names file and parameter.
    """
    module = nnx.eval_shape(make)
    targets = param_paths(module)
    compiled = [(re.compile(p), t, f) for p, t, f in rules]
    filled: set[str] = set()
    for key, (read, file) in tensors.items():
        for pattern, template, transform in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            target = match.expand(template)
            if target not in targets:
                raise WeightLoadError(
                    f"{file}: tensor {key!r} maps to parameter {target!r}, which this model "
                    f"does not have (is the config the checkpoint's?)"
                )
            array = read()
            var = targets[target]
            value = np.asarray(transform(array), dtype=var.dtype)
            if value.shape != var.shape:
                raise WeightLoadError(
                    f"{file}: tensor {key!r} has shape {tuple(array.shape)} (as "
                    f"{tuple(value.shape)} after conversion) but parameter {target!r} "
                    f"expects {tuple(var.shape)}"
                )
            var.set_value(_put(value, place))
            filled.add(target)
            break
    missing = sorted(set(targets) - filled)
    if missing:
        files = sorted({str(f) for _, f in tensors.values()})
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise WeightLoadError(
            f"{source}: no tensor in {files} for parameter(s) {shown}; refusing to leave them "
            "uninitialised"
        )
    return module


def _put(value: np.ndarray, place: Place | None) -> jax.Array:
    """``value`` on the default device, or on ``place(value.shape)`` shard by shard."""
    if place is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, place(value.shape), lambda i: value[i])


def export_params(module: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_module`: ``{hf_key: array}`` for every parameter.

    Works for rules whose patterns are plain keys with ``(\\d+)`` groups (dots may stay
    unescaped) and whose transforms are listed in :data:`INVERSES`; used to write
    checkpoints that ``from_pretrained`` (ours and ``transformers``') reads back.
    """
    out = {}
    for path, var in param_paths(module).items():
        for pattern, template, transform in rules:
            groups = _match_template(template, path)
            if groups is None:
                continue
            key = pattern
            for value in groups:
                key = key.replace(r"(\d+)", value, 1)
            key = key.replace("\\.", ".")
            if transform not in INVERSES or re.search(r"[()\[\]?*+|\\]", key):
                raise ValueError(f"rule {pattern!r} -> {template!r} cannot be inverted")
            out[key] = np.asarray(INVERSES[transform](np.asarray(var[...])))
            break
        else:
            raise ValueError(f"no rule produces parameter {path!r}")
    return out


def _match_template(template: str, path: str) -> list[str] | None:
    """Numbers a module path gives to the ``\\1``, ``\\2`` ... of a template, or None."""
    parts = re.split(r"\\(\d)", template)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<g{part}>\\d+)" for i, part in enumerate(parts)
    )
    match = re.fullmatch(regex, path)
    if match is None:
        return None
    return [match.group(f"g{n}") for n in sorted({p for p in parts[1::2]}, key=int)]
