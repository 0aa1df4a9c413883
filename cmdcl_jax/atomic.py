"""Files and directories that appear whole or not at all.

A write goes to a temporary name beside the target and is renamed over it, so a crash
leaves either the old content or the new one, never a mix. A directory also gets a
manifest (each file's size and SHA-256) as its last file, so that one left damaged by
other means (an older writer, a copy cut short) is told apart from a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

MANIFEST = ".manifest.json"


def write_text(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text`` in one rename."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _contents(directory: Path) -> dict[str, dict]:
    return {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _digest(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_directory(directory: Path, fill: Callable[[Path], object]) -> None:
    """Creates ``directory`` whole: ``fill(tmp)`` writes into a temporary sibling, which
    gets a manifest and is renamed to ``directory`` (which must not exist)."""
    for stale in directory.parent.glob(f".{directory.name}.*.part"):  # from killed writers
        shutil.rmtree(stale, ignore_errors=True)
    partial = directory.with_name(f".{directory.name}.{os.getpid()}.part")
    partial.mkdir(parents=True)
    fill(partial)
    write_text(partial / MANIFEST, json.dumps(_contents(partial), indent=1))
    os.rename(partial, directory)


def directory_damage(directory: Path) -> str | None:
    """Why ``directory`` is not as :func:`write_directory` left it; None when it is."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (an interrupted or outside write)"
    try:
        expected = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        return f"{manifest}: unreadable ({err})"
    found = _contents(directory)
    for name in sorted(expected.keys() | found.keys()):
        if expected.get(name) != found.get(name):
            what = "missing" if name not in found else "not in the manifest"
            if name in found and name in expected:
                what = "changed since written"
            return f"{directory / name}: {what}"
    return None
