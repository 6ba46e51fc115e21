"""Great Expectations in a side process that starts with the stage, so its import overlaps the stage's work.

This is the stage's side (:class:`SideProcess`); the child runs ``python -m touchvl.gx_worker``.

Why: from clean, every validating stage imports GX (~2.6 s) and builds a context (~0.5 s) on its critical path,
ten times per ``make repro``; the stages compute on half the CPUs (``threads: auto``), so the other half can
import GX meanwhile. Not a ``ProcessPoolExecutor``: a spawned pool re-imports the stage's ``__main__`` module
in the child (torch, for the projector stage) and cannot kill a worker that is still importing, which an unused
one (a replayed validation, a stage that failed first) must be at exit, without waiting for it.

The protocol is pickles over the child's stdin and a private copy of its stdout: one request
``(stage, tables, params)`` -> ``("ok", outcomes)`` or ``("error", exception)``. Both sides run the same
:func:`touchvl.checks.gx_outcomes`; whatever goes wrong with the process itself (it died, a pickle failed) makes
the stage run GX in its own process instead -- the same results, only later. The child ignores Ctrl-C (its own
process group): the stage handles it and stops the child. It inherits the stage's environment, as GX would
in-process, and logs to the stage's stderr.
"""
from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys


class Unavailable(Exception):
    """The side process cannot answer (never started, died, or a request could not be pickled)."""


class SideProcess:
    """One child running :func:`serve`; :meth:`run` validates there, :meth:`close` stops it (also at exit)."""

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "touchvl.gx_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, process_group=0)
        self.answered = 0  # requests it answered (an error raised there counts: it was GX's answer)
        atexit.register(self.close)

    def run(self, stage: str, tables: list, params) -> list:
        """The outcomes, as :func:`touchvl.checks.gx_outcomes` returns them; re-raises what it raised there."""
        if self.proc.poll() is not None:
            raise Unavailable(f"exited with status {self.proc.returncode}")
        try:
            pickle.dump((stage, tables, params), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
            status, payload = pickle.load(self.proc.stdout)
            self.answered += 1
        except (OSError, EOFError, pickle.PickleError, AttributeError, TypeError) as exc:
            self.close()
            raise Unavailable(f"{type(exc).__name__}: {exc}") from None
        if status == "error":
            raise payload
        return payload

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # an idle child only imports or waits: nothing of it to keep
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:  # a pipe the child never read: nothing to flush to
                pass
