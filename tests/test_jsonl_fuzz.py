"""Seeded fuzzing of `touchvl validate`: 240 mutated files (tests/jsonl_fuzz.py), zero tracebacks, exit 0/1/2.

In-process through the real command (`touchvl.cli.main`: argument parsing, validation, reports, printing) for
speed, and a few through a real `python -m touchvl` process.  The work is bounded (240 files of at most a few
MB, every tenth with --check-urls against addresses that are refused or do not resolve).
"""
import contextlib
import io
import json
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

from tests.jsonl_fuzz import mutants, seed_file
from touchvl.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEED, N = 20_260_115, 240


def run_in_process(args: list[str]) -> tuple[int | None, str, str, str | None]:
    """(exit status, stdout, stderr, traceback text or None) of one `touchvl` command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(args)
        except SystemExit as exc:  # argparse
            status = exc.code
        except BaseException:  # noqa: BLE001 -- exactly what the test counts
            return None, out.getvalue(), err.getvalue(), traceback.format_exc()
    return status, out.getvalue(), err.getvalue(), None


def fuzz(folder: Path, seed: int = SEED, n: int = N) -> tuple[Counter, list[tuple[str, str]]]:
    statuses, tracebacks = Counter(), []
    for i, (name, data) in enumerate(mutants(seed, n)):
        path = folder / f"{name}.jsonl"
        path.write_bytes(data)
        report_dir = folder / "reports" / name
        args = ["validate", str(path), "--report-dir", str(report_dir)] + (["--check-urls"] if i % 10 == 0 else [])
        status, stdout, stderr, tb = run_in_process(args)
        if tb is None and status in (0, 1):
            try:  # a verdict comes with its three reports, readable
                json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
                (report_dir / "report.md").read_text(encoding="utf-8")
                (report_dir / "report.html").read_text(encoding="utf-8")
            except (OSError, ValueError) as exc:
                tb = f"reports of {name}: {exc!r}"
        if tb is not None:
            tracebacks.append((name, tb))
        statuses[status] += 1
    return statuses, tracebacks


def test_fuzzed_files_never_crash_the_validator(tmp_path):
    (tmp_path / "seed.jsonl").write_bytes(seed_file())
    with contextlib.chdir(tmp_path):  # outside any project: validate's defaults, no params.yaml to parse each time
        assert run_in_process(["validate", str(tmp_path / "seed.jsonl"), "--report-dir", str(tmp_path / "seed")])[0] == 0
        statuses, tracebacks = fuzz(tmp_path)
    assert not tracebacks, f"{len(tracebacks)} tracebacks, first: {tracebacks[0][0]}\n{tracebacks[0][1]}"
    assert sum(statuses.values()) == N and set(statuses) <= {0, 1, 2}, statuses
    assert statuses[1] > N // 2  # most mutations make the file invalid, and they are found


def test_some_fuzzed_files_through_the_real_command(tmp_path):
    picked = [(name, data) for name, data in mutants(SEED, 48)
              if name.split("_", 1)[1] in ("deep", "surrogate", "bad_image")][:3]
    assert len(picked) == 3
    for name, data in picked:
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        proc = subprocess.run([sys.executable, "-m", "touchvl", "validate", str(path)], cwd=ROOT,
                              capture_output=True, text=True, errors="replace", timeout=120)
        assert proc.returncode in (0, 1, 2) and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert (tmp_path / f"{name}.report" / "report.html").is_file()
