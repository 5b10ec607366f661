"""Fault injection from outside, as Ray's own chaos tests do: production code has no hooks.

:class:`WorkerKiller` watches from a thread of the test process and, once its condition
holds, sends SIGKILL to one Ray Train worker process, once. Workers are found by process title
(``ray::RayTrainWorker...``) among the children of the raylet of one Ray session (named by its
session directory), so a kill never reaches another Ray instance on the same machine. The
condition is what makes the kill land mid-training, e.g. "the first epoch's checkpoint
exists" for a run of several epochs.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

TRAIN_WORKER_TITLE = "ray::RayTrainWorker"


def current_session_dir() -> str:
    """The session directory of the Ray instance this process is connected to."""
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def train_worker_pids(session_marker: str) -> list[int]:
    """Ray Train workers started by a raylet whose command line contains ``session_marker``
    (a session directory, or the temp dir it lives in)."""
    pids = []
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        if "raylet" not in (process.info.get("name") or "") or session_marker not in cmdline:
            continue
        try:
            children = process.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                if " ".join(child.cmdline()).startswith(TRAIN_WORKER_TITLE):
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                continue
    return sorted(pids)


def first_checkpoint_under(storage: Path, pattern: str = "*/epoch_0000") -> Callable[[], Path | None]:
    """A condition: the first run directory under ``storage`` whose first epoch is stored."""

    def found() -> Path | None:
        return next(iter(sorted(storage.glob(pattern))), None)

    return found


class WorkerKiller:
    """Kill one Ray Train worker, once, as soon as ``condition()`` returns something truthy.

    ``killed_pid`` and ``trigger`` (what the condition returned) say what happened; use it as
    a context manager so the watching thread always stops.
    """

    def __init__(
        self, condition: Callable[[], object], session_marker: str, poll_s: float = 0.05, timeout_s: float = 600
    ) -> None:
        self.condition, self.session_marker = condition, session_marker
        self.poll_s, self.timeout_s = poll_s, timeout_s
        self.killed_pid: int | None = None
        self.trigger: object = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-killer", daemon=True)

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            trigger = self.condition()
            pids = train_worker_pids(self.session_marker) if trigger else []
            if pids:
                victim = pids[-1]  # the newest: a worker of the run that triggered
                try:
                    psutil.Process(victim).send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    continue
                self.killed_pid, self.trigger = victim, trigger
                return
            time.sleep(self.poll_s)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
