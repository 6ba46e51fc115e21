"""The one device resolver: ``auto`` picks cuda, then mps, then cpu; an explicit name is honoured or fails.

Imports only torch (never torchvision), and only when called, so a stage that merely needs to know its device
pays nothing at import time.
"""
from __future__ import annotations

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
