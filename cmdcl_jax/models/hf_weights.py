"""Reading Hugging Face checkpoints (config.json + safetensors) into NNX modules.

A checkpoint source is a local directory written by ``save_pretrained`` or a Hugging Face
model id (fetched into the local hub cache; offline machines must pass a directory).
Tensors are read with ``safetensors.numpy``: no PyTorch at run time. A legacy
``pytorch_model.bin`` is read only where PyTorch happens to be installed.

Each model file declares a table of rules ``(hf_key_regex, module_path_template, transform)``.
:func:`load_params` fills every ``nnx.Param`` of the module from the tensors the rules
match and raises :class:`WeightLoadError` naming the file and parameter at fault when a
parameter finds no tensor or a shape disagrees: no parameter is left silently random.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]
Rule = tuple[str, str, Transform]


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


def read_tensors(directory: Path) -> dict[str, tuple[np.ndarray, Path]]:
    """Reads every tensor of a checkpoint directory as ``{key: (array, file)}``."""
    from safetensors.numpy import load_file

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
            loaded = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - a corrupt file, whatever the parser says
            raise WeightLoadError(f"{path}: unreadable safetensors file ({err})") from err
        tensors.update({k: (v, path) for k, v in loaded.items()})
    return tensors


def _read_torch_bin(path: Path) -> dict[str, tuple[np.ndarray, Path]]:
    try:
        import torch
    except ImportError as err:
        raise WeightLoadError(
            f"{path}: a PyTorch pickle needs PyTorch to read. Install torch, or convert it once "
            "to safetensors (load it with transformers and call save_pretrained)."
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float().numpy(), path) for k, v in state.items()}


def param_paths(module: nnx.Module) -> dict[str, nnx.Param]:
    """Every ``nnx.Param`` of ``module`` by dotted path (``layers.0.attn.query.kernel``)."""
    return {
        ".".join(map(str, path)): node
        for path, node in nnx.iter_graph(module)
        if isinstance(node, nnx.Param)
    }


def load_module(
    make: Callable[[], nnx.Module],
    tensors: dict[str, tuple[np.ndarray, Path]],
    rules: Sequence[Rule],
    *,
    source: str,
) -> nnx.Module:
    """Builds ``make()`` without random initialisation and fills it with :func:`load_params`.

    The module is traced with ``nnx.eval_shape``; its parameters get zero storage, which
    ``load_params`` then overwrites in full or raises: nothing stays zero silently.
    """
    module = nnx.eval_shape(make)
    for var in param_paths(module).values():
        var.set_value(jnp.zeros(var.shape, var.dtype))
    load_params(module, tensors, rules, source=source)
    return module


def load_params(
    module: nnx.Module,
    tensors: dict[str, tuple[np.ndarray, Path]],
    rules: Sequence[Rule],
    *,
    source: str,
) -> None:
    """Fills every parameter of ``module`` in place from ``tensors`` through ``rules``.

    A tensor key is matched against the rules in order (``re.fullmatch``); the first match
    names the target parameter (``match.expand(template)``) and the transform to apply.
    Tensors no rule matches are ignored (other towers, buffers).

    Raises:
      WeightLoadError: a rule names a parameter the module lacks, a shape disagrees, or a
        parameter of the module is not filled. The message names file and parameter.
    """
    targets = param_paths(module)
    compiled = [(re.compile(p), t, f) for p, t, f in rules]
    filled: set[str] = set()
    for key, (array, file) in tensors.items():
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
            value = transform(np.asarray(array))
            var = targets[target]
            if value.shape != var.shape:
                raise WeightLoadError(
                    f"{file}: tensor {key!r} has shape {tuple(array.shape)} (as "
                    f"{tuple(value.shape)} after conversion) but parameter {target!r} "
                    f"expects {tuple(var.shape)}"
                )
            var[...] = jnp.asarray(value, dtype=var.dtype)
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
            "randomly initialised"
        )


def export_params(module: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_params`: ``{hf_key: array}`` for every parameter.

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
