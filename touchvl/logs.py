"""Logging and clean exits shared by every entry point (stages, the ``touchvl`` CLI, the flows).

Our own loggers (``touchvl``, ``tasks``, ``flows``) log at INFO; every library logs at WARNING unless
``--verbose`` (or ``TOUCHVL_VERBOSE=1``): FAISS's loader lines, Great Expectations' temp folders and oss2's
request dumps -- which include signatures -- stay out of a normal run's output.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from touchvl.errors import StageError

OUR_LOGGERS = ("touchvl", "tasks", "flows", "bench")
FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool | None = None) -> None:
    if verbose is None:
        verbose = os.environ.get("TOUCHVL_VERBOSE", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=FORMAT, force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def run_main(stage: str, body: Callable[[], object], verbose: bool | None = None) -> None:
    """Run ``body``; a :class:`StageError` ends the process with ``<stage> failed: <message>`` (exit 1)."""
    setup_logging(verbose)
    try:
        body()
    except StageError as exc:
        sys.exit(f"{stage} failed: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"{stage}: interrupted")


def stage_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A stage's argument parser: ``--help`` prints the module's docstring and exits before any work."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().split("\n\n")[0],
                                     epilog="Params come from params.yaml (see touchvl/params.py).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--verbose", action="store_true", help="library logs too (DEBUG)")
    return parser


def run_stage(name: str, doc: str | None, body: Callable, argv: list[str] | None = None,
              configure: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """The whole ``main()`` of a DVC stage: parse (``--help`` exits here), load params once, run ``body``.

    ``body(params, args)`` does the work; a :class:`StageError` anywhere ends in one line, exit 1.
    """
    parser = stage_parser(f"python -m tasks.{name}", doc)
    if configure:
        configure(parser)
    args = parser.parse_args(argv)

    def go() -> None:
        from touchvl.params import load_params

        body(load_params(args.params), args)

    run_main(name, go, verbose=args.verbose)
