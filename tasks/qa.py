"""Alias kept for scripts and docs: ``python -m tasks.qa ask IMAGE QUESTION ...`` = ``touchvl ask IMAGE QUESTION ...``.

(Not a DVC stage; TouchQA itself is touchvl.qa.)
"""
from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> None:
    cli = importlib.import_module("touchvl.cli").main
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ask"]:
        argv = argv[1:]
    sys.exit(cli(["-C", ".", "ask", *argv]))


if __name__ == "__main__":
    main()
