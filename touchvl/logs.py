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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream of the moment it was made):
    an entry point called in-process (tests, notebooks) must not leave a handler on a stream that gets closed."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always answers sys.stderr
        pass


def setup_logging(verbose: bool | None = None) -> None:
    """Root at WARNING (DEBUG with ``verbose``), our loggers at INFO; one stderr handler of ours, whatever other
    handlers (pytest's, Prefect's) are already installed -- they are left alone."""
    if verbose is None:
        verbose = os.environ.get("TOUCHVL_VERBOSE", "") not in ("", "0")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        root.addHandler(_StderrHandler())
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
              configure: Callable[[argparse.ArgumentParser], None] | None = None,
              start: Callable | None = None) -> None:
    """The whole ``main()`` of a DVC stage: parse (``--help`` exits here), load params once, run ``body``.

    ``body(params, args)`` does the work; a :class:`StageError` anywhere ends in one line, exit 1.
    ``start(params)`` runs first, in the stage's own process only (not when a test or a flow calls the stage's
    ``run()``): a validating stage passes ``touchvl.checks.stage_starts``, which starts importing Great
    Expectations in a side process while ``body`` works.
    """
    parser = stage_parser(f"python -m tasks.{name}", doc)
    if configure:
        configure(parser)
    args = parser.parse_args(argv)

    def go() -> None:
        from touchvl.params import load_params

        params = load_params(args.params)
        if start is not None:
            start(params)
        body(params, args)

    run_main(name, go, verbose=args.verbose)
