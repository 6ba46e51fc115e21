"""Quiet logs: our loggers at INFO, every library at WARNING, --verbose for everything."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = """
import logging, sys
from touchvl.logs import setup_logging
setup_logging({verbose})
import faiss                      # its loader logs nine INFO lines at import
from touchvl import checks        # Great Expectations logs its temp folders at INFO
import matplotlib.font_manager    # the font cache
logging.getLogger("oss2").info("Make signature: string to be signed = GET ... Signature=abc")
logging.getLogger("touchvl.embed").info("ours: embedded 3 pairs")
checks.gx.get_context(mode="ephemeral")
"""


def _run(verbose) -> str:
    proc = subprocess.run([sys.executable, "-c", SNIPPET.format(verbose=verbose)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_libraries_log_at_warning_ours_at_info():
    out = _run(None)
    assert "ours: embedded 3 pairs" in out
    for noisy in ("faiss.loader", "great_expectations", "matplotlib", "Signature", "oss2"):
        assert noisy not in out, out


def test_verbose_lets_library_logs_through():
    out = _run(True)
    assert "ours: embedded 3 pairs" in out and "faiss.loader" in out and "Signature" in out
