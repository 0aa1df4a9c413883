"""The workdir lock: one training run per workdir at a time.

``<workdir>/lock`` holds the holder's host, PID and start time. It is created whole (a
hard link to a finished file) or not at all. A lock whose process is gone from this host
is stale and taken over with a warning; any other is refused, naming its holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cmdcl_jax import atomic


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            line = next(x for x in f if x.startswith("btime "))
        return float(line.split()[1])
    except (OSError, StopIteration):
        return None


def _process_start(pid: int) -> float | None:
    """Start time (seconds since the epoch) of process ``pid``, where /proc tells it."""
    boot = _boot_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if boot is None:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int, since: float) -> bool:
    """Whether process ``pid`` of this host runs and is the one that started at ``since``."""
    if pid == os.getpid():
        return False  # not us: we hold no lock yet, so an earlier process with our PID
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    return started is None or started <= since + 1.0  # later: the PID was reused


class WorkdirLock:
    """Context manager holding ``<workdir>/lock`` for one training run."""

    def __init__(self, workdir: Path):
        self.path = workdir / "lock"
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _read(self) -> dict | None:
        """The lock's holder; None if there is no lock or it cannot be read."""
        try:
            held = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return held if isinstance(held, dict) and held.keys() == self.holder.keys() else None

    def __enter__(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f".lock.{os.getpid()}")
        atomic.write_text(mine, json.dumps(self.holder))
        try:
            try:
                os.link(mine, self.path)
                return self
            except FileExistsError:
                pass
            held = self._read()
            if held is None:
                raise WorkdirLockedError(
                    f"{self.path}: unreadable lock; if no run uses this workdir, delete it"
                )
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["started"]))
            who = f"PID {held['pid']} on {held['host']}, started {when}"
            if held["host"] != self.holder["host"] or _alive(held["pid"], held["started"]):
                raise WorkdirLockedError(
                    f"{self.path.parent} is in use by another run ({who}); wait for it or "
                    f"use another --workdir (delete {self.path} only if that run is gone)"
                )
            logging.warning("%s: taking over the stale lock of %s (gone)", self.path, who)
            os.replace(mine, self.path)
            if self._read() != self.holder:
                raise WorkdirLockedError(f"{self.path}: another run took over the stale lock")
            return self
        finally:
            mine.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if self._read() == self.holder:
            self.path.unlink()


@contextlib.contextmanager
def hold_workdir(workdir: Path):
    """Holds the workdir lock (process 0 takes it) for the duration of the block."""
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.__enter__()
        except WorkdirLockedError as err:
            error = err
    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not locked:
        raise WorkdirLockedError(f"process 0 could not lock {workdir}")
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__()
