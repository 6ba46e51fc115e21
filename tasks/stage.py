"""What every stage's ``main()`` shares: logging set-up and clean failure for user errors."""
from __future__ import annotations

import logging
import sys
from typing import Callable


class StageError(RuntimeError):
    """A failure the user can act on (bad params, bad data, failed validation): printed, no traceback."""


def run_main(stage: str, body: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        body()
    except StageError as exc:
        sys.exit(f"{stage} failed: {exc}")
