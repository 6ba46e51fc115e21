"""The one device resolver: ``auto`` picks cuda, then mps, then cpu; an explicit name is honoured or fails.

Imports only torch (never torchvision), and only when called, so a stage that merely needs to know its device
pays nothing at import time.
"""
from __future__ import annotations

import os

from touchvl.errors import StageError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str, key: str = "device") -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``; ``key`` is the param's dotted name for the error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = name.split(":", 1)[0]
    if kind not in DEVICES[1:]:
        raise StageError(f"{key}={name!r} is not a device (choose one of {', '.join(DEVICES)})")
    if kind == "cuda" and not torch.cuda.is_available():
        raise StageError(f"{key}={name!r} but CUDA is not available here (use 'auto' or 'cpu')")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise StageError(f"{key}={name!r} but MPS is not available here (use 'auto' or 'cpu')")
    return name


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask / cgroup cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_threads(setting: int | str, workers: int = 0, cpus: int | None = None) -> int:
    """How many torch / OpenMP threads a stage uses: an int is honoured; ``auto`` is half the usable CPUs,
    less the decoding workers (each of those runs one thread), and at least 1.

    Why half and not all: OpenMP threads spin-wait at every barrier, and when a core is shared they wait for a
    thread that is not running.  Measured on the 2-core CI machine with one competing process on the other core
    (issue 21): projector stage 1 took 106 s with torch's default of 2 threads and 13.3 s with 1 (8x); on an
    idle machine 1 thread cost only 1.12x.  DVC, Prefect and a user's editor share the machine, so ``auto``
    takes the safe side.
    """
    if setting != "auto":
        return int(setting)
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, (cpus - workers) // 2)


def apply_threads(setting: int | str, workers: int = 0) -> int:
    """Size this process's thread pools: torch's intra-op pool and FAISS's OpenMP pool where they are loaded,
    and ``OMP_NUM_THREADS`` for whichever is imported later (a stage that never needs torch does not pay its
    2 s import here)."""
    import sys

    n = resolve_threads(setting, workers)
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(n)
    return n


def one_thread_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a decoding worker runs one torch thread, never a pool per worker."""
    import torch

    torch.set_num_threads(1)
