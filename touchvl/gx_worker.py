"""The child of :class:`touchvl.gx_side.SideProcess`: imports Great Expectations at once, then validates what the
stage sends (pickles on stdin, replies on a private copy of stdout) until stdin closes. Started by the stage,
not by hand."""
from __future__ import annotations

import argparse
import os
import pickle
import sys

from touchvl.gx_side import Unavailable


def serve(requests, replies) -> None:
    """The child's loop: import GX first (the point of starting early), then answer until stdin closes."""
    from touchvl import checks

    checks.import_gx()
    while True:
        try:
            stage, tables, params = pickle.load(requests)
        except EOFError:
            return
        try:
            reply = ("ok", checks.gx_outcomes(stage, tables, params))
        except Exception as exc:  # sent back and raised in the stage, as it would have been raised in-process
            reply = ("error", exc)
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an exception that does not pickle: the stage runs GX itself and meets it there
            data = pickle.dumps(("error", Unavailable(f"reply does not pickle: {exc}")))
        replies.write(data)
        replies.flush()


def main(argv: list[str] | None = None) -> None:
    from touchvl.logs import setup_logging

    argparse.ArgumentParser(prog="python -m touchvl.gx_worker", description=__doc__.split("\n\n")[0]).parse_args(argv)
    setup_logging()
    replies = os.fdopen(os.dup(1), "wb")  # the protocol's own stream: whatever a library prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
