"""``dvc repro`` from clean, HEAD against a baseline commit, every stage's process timed, in one run.

    .venv/bin/python -m bench.repro [--baseline f2b5864] [--runs 3]

For each round (``--runs``, interleaved: baseline, then HEAD, so a drift in the machine's load hits both) each
revision is cloned from this repository into a temporary folder (committed work only: uncommitted changes are not
measured), with an empty DVC cache, no validation replay records and no embedding cache, and ``dvc repro`` runs
there with this project's venv.  ``TOUCHVL_PYTHON`` (read by ``bin/stage``) points at a wrapper that times each
stage's python process from outside, so the figures split into

* **stage seconds**: the stages' own processes, imports included;
* **DVC's overhead**: the rest of ``dvc repro``'s wall clock (reading dvc.yaml, hashing deps and outs, moving outs
  into the cache, writing dvc.lock).

The headline is like for like: the stages both revisions have (keyed by their command, ``bin/stage X args``), whole
``dvc repro`` wall less the stages only HEAD has (their processes; their share of DVC's overhead stays in).  The
default baseline, f2b5864, is the commit the performance issue (21) was filed at: its goal is ``make repro`` from
clean at least 25 % faster.  The load average before and after is printed and written: it says how much to trust the
seconds.  Writes bench/results/repro.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from touchvl import disk

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GOAL_FASTER = 0.25  # issue 21: make repro from clean at least 25 % faster than at the commit it was filed at

# Why a shell wrapper and not Python: it must not add an interpreter start of its own to what it times.
_WRAPPER = """#!/bin/sh
start=$(date +%s%N)
"{python}" "$@"
rc=$?
end=$(date +%s%N)
echo "$start $end $*" >> "{log}"
exit $rc
"""


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def stage_label(argv: str) -> str:
    """``-m tasks.train_projector --stage 1`` -> ``train_projector --stage 1`` (bin/stage's own spelling)."""
    parts = argv.split()
    if len(parts) >= 2 and parts[0] == "-m" and parts[1].startswith("tasks."):
        return " ".join([parts[1][len("tasks."):], *parts[2:]])
    return argv


def parse_stage_log(text: str) -> dict[str, float]:
    """The wrapper's lines (``start_ns end_ns argv``) -> seconds by stage label (a stage run twice: summed)."""
    seconds: dict[str, float] = {}
    for line in text.splitlines():
        start, end, argv = line.split(" ", 2)
        label = stage_label(argv)
        seconds[label] = seconds.get(label, 0.0) + (int(end) - int(start)) / 1e9
    return seconds


def check_every_stage_timed(dvc_output: str, stage_log: str, rev: str) -> None:
    """Stop when ``dvc repro`` ran a stage the wrapper did not time (a stage that does not go through
    ``bin/stage``): its seconds would silently count as DVC's overhead."""
    ran = dvc_output.count("Running stage '")
    timed = len(stage_log.splitlines())
    if ran != timed:
        raise SystemExit(f"bench.repro: at {rev[:8]} dvc repro ran {ran} stages but {timed} went through bin/stage's "
                         f"timing wrapper: the figures would put the others' time into DVC's overhead")


def write_wrapper(path: Path, log: Path) -> Path:
    """An executable that runs this interpreter with its arguments, passes its exit status on, and appends
    ``start_ns end_ns argv`` to ``log``."""
    path.write_text(_WRAPPER.format(python=sys.executable, log=log))
    path.chmod(0o755)
    return path


def repro_once(rev: str, workdir: Path) -> dict:
    """Clone ``rev`` into ``workdir``, ``dvc repro`` from clean there; wall seconds and each stage's seconds."""
    _git("clone", "--quiet", "--no-checkout", "--shared", str(ROOT), str(workdir))
    _git("checkout", "--quiet", "--detach", rev, cwd=workdir)
    (workdir / ".venv").symlink_to(VENV_BIN.parent)  # bin/stage, and the Makefile, find the venv here
    log = workdir / ".stage-times.log"
    wrapper = write_wrapper(workdir / ".stage-python", log)
    env = {**os.environ, "TOUCHVL_PYTHON": str(wrapper), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    done = subprocess.run([str(VENV_BIN / "dvc"), "repro"], cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"bench.repro: dvc repro at {rev} failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
                         f"\n{done.stderr[-3000:]}")
    stages = parse_stage_log(log.read_text() if log.exists() else "")
    check_every_stage_timed(done.stdout + done.stderr, log.read_text() if log.exists() else "", rev)
    return {"wall_s": wall, "stages_s": stages, "dvc_overhead_s": wall - sum(stages.values())}


def like_for_like(base: dict, head: dict) -> dict:
    """Common stages' seconds, and whole walls less the stages only one side has."""
    common = sorted(set(base["stages_s"]) & set(head["stages_s"]))
    only_head = sorted(set(head["stages_s"]) - set(base["stages_s"]))
    only_base = sorted(set(base["stages_s"]) - set(head["stages_s"]))
    return {
        "common_stages": common, "only_head": only_head, "only_baseline": only_base,
        "baseline_stages_s": sum(base["stages_s"][s] for s in common),
        "head_stages_s": sum(head["stages_s"][s] for s in common),
        "baseline_wall_s": base["wall_s"] - sum(base["stages_s"][s] for s in only_base),
        "head_wall_s": head["wall_s"] - sum(head["stages_s"][s] for s in only_head),
    }


def _stats(values: list[float]) -> dict:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2),
            "runs": [round(v, 2) for v in values]}


def _rounds(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--runs must be at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="f2b5864", help="the revision to compare with (default: where issue 21 was filed)")
    ap.add_argument("--head", default="HEAD", help="the revision measured (default: HEAD, committed work only)")
    # 3 by default: on a shared 2-core machine one round has measured 12-31 % for the same pair of commits
    ap.add_argument("--runs", type=_rounds, default=3,
                    help="interleaved rounds, min and median reported (each is two full dvc repro runs; default 3)")
    args = ap.parse_args(argv)
    revs = {"baseline": _git("rev-parse", args.baseline), "head": _git("rev-parse", args.head)}
    result = {"python": platform.python_version(), "cpus": os.cpu_count(), "runs": args.runs, "revisions": revs,
              "load_average_before": [round(x, 2) for x in os.getloadavg()], "rounds": []}
    for i in range(args.runs):
        round_ = {}
        for side, rev in revs.items():
            with tempfile.TemporaryDirectory(prefix=f"bench-repro-{side}-") as tmp:
                r = round_[side] = repro_once(rev, Path(tmp) / "repo")
                print(f"round {i + 1} {side} {rev[:8]}: dvc repro {r['wall_s']:.1f} s, stages "
                      f"{sum(r['stages_s'].values()):.1f} s, DVC overhead {r['dvc_overhead_s']:.1f} s", flush=True)
        round_["like_for_like"] = like_for_like(round_["baseline"], round_["head"])
        result["rounds"].append(round_)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    lfl = [r["like_for_like"] for r in result["rounds"]]
    summary = {key: _stats([x[key] for x in lfl]) for key in
               ("baseline_stages_s", "head_stages_s", "baseline_wall_s", "head_wall_s")}
    for what in ("stages", "wall"):
        b, h = summary[f"baseline_{what}_s"]["median"], summary[f"head_{what}_s"]["median"]
        summary[f"faster_{what}"] = round(1 - h / b, 3)
    summary["per_stage_median_s"] = {
        side: {s: round(statistics.median(r[side]["stages_s"].get(s, 0.0) for r in result["rounds"]), 2)
               for s in sorted(set().union(*(r[side]["stages_s"] for r in result["rounds"])))}
        for side in revs}
    summary["head_full_wall_s"] = _stats([r["head"]["wall_s"] for r in result["rounds"]])
    result["summary"] = summary
    result["goal"] = {"faster_at_least": GOAL_FASTER, "met_wall": summary["faster_wall"] >= GOAL_FASTER,
                      "met_stages": summary["faster_stages"] >= GOAL_FASTER,
                      "common_stages": lfl[0]["common_stages"], "only_head": lfl[0]["only_head"]}
    disk.write_json(ROOT / "bench" / "results" / "repro.json", result)
    print("seconds by stage (median), baseline -> head:")
    for s in sorted(set(summary["per_stage_median_s"]["baseline"]) | set(summary["per_stage_median_s"]["head"])):
        b, h = summary["per_stage_median_s"]["baseline"].get(s), summary["per_stage_median_s"]["head"].get(s)
        print(f"  {s:<28} {'-' if b is None else f'{b:6.1f}'} -> {'-' if h is None else f'{h:6.1f}'}")
    print(f"load average (1, 5, 15 min) before {result['load_average_before']}, after {result['load_average_after']} "
          f"on {result['cpus']} CPUs")
    print(f"like for like ({len(lfl[0]['common_stages'])} common stages; only at head: {', '.join(lfl[0]['only_head']) or 'none'}):"
          f" stages {summary['baseline_stages_s']['median']} -> {summary['head_stages_s']['median']} s "
          f"({summary['faster_stages']:.1%} faster); dvc repro less head-only stages {summary['baseline_wall_s']['median']} -> "
          f"{summary['head_wall_s']['median']} s ({summary['faster_wall']:.1%} faster); goal >= {GOAL_FASTER:.0%}: "
          f"{'met' if result['goal']['met_wall'] else 'NOT met'} on the wall, "
          f"{'met' if result['goal']['met_stages'] else 'NOT met'} on the stages' own time")


if __name__ == "__main__":
    main()
