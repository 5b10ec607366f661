"""Memory of a process tree, for the benches that sample a child (its Ray processes included)."""

from __future__ import annotations

import psutil


def tree_memory(root_process: psutil.Process) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) over a process and all its descendants, in bytes. RSS counts a
    shared page (Ray's object store) once per process mapping it; PSS splits it between them."""
    pss = rss = 0
    try:
        processes = [root_process, *root_process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
            continue
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
    return pss, rss
