"""The architecture, checked from the code: no import cycles, nothing imports a stage, dvc.yaml's code deps
cover every stage's import closure, and the CLI answers --help everywhere without doing any work."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.import_graph import ROOT, closure, cycles, graph, modules


def test_no_import_cycles():
    edges = {m: {t for t in targets if t.startswith("touchvl")} for m, targets in graph().items() if m.startswith("touchvl")}
    assert cycles(edges) == []


def test_cycle_detection_finds_a_cycle():  # the check above can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_nothing_imports_a_stage_module():
    offenders = [(m, t) for m, targets in graph().items() for t in targets
                 if t.startswith("tasks.") and not m.startswith("tests.")]
    assert offenders == []


def test_the_library_never_reads_params_yaml_itself():
    """touchvl takes typed params; only the entry points (the CLI) call load_params."""
    callers = [str(p.relative_to(ROOT)) for name, p in modules().items()
               if name.startswith("touchvl") and name not in ("touchvl.params", "touchvl.cli", "touchvl.logs")
               and re.search(r"\bload_params\(", p.read_text())]
    assert callers == []


def _stage_entry(cmd: str) -> str:
    match = re.match(r"bin/stage (\w+)", cmd)
    assert match, f"stage command {cmd!r} does not go through bin/stage"
    return f"tasks.{match.group(1)}"


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def missing_code_deps(dvc_yaml: dict) -> dict[str, list[str]]:
    edges, known = graph(), modules()
    missing = {}
    for name, stage in dvc_yaml["stages"].items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        files = [known[m] for m in closure(_stage_entry(stage["cmd"]), edges)]
        gaps = sorted(f.relative_to(ROOT).as_posix() for f in files if not _covered(f, deps))
        if gaps:
            missing[name] = gaps
    return missing


def test_dvc_yaml_code_deps_cover_each_stages_import_closure():
    assert missing_code_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text())) == {}


def test_a_missing_code_dep_is_reported():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc_yaml["stages"]["evaluate"]["deps"].remove("touchvl/retrieval")
    assert "touchvl/retrieval/query.py" in missing_code_deps(dvc_yaml)["evaluate"]


TOUCHVL = Path(sys.executable).parent / "touchvl"
SUBCOMMANDS = [[], ["search"], ["ask"], ["chat"], ["validate"], ["generate"], ["finetune"], ["export"], ["evaluate-real"],
               ["plots"], ["download-weights"],
               *[["finetune", a] for a in ("plan", "approve", "submit", "status", "events", "cancel", "list", "serve")]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "touchvl")
def test_cli_help_at_every_level_from_any_directory(words, tmp_path):
    proc = subprocess.run([str(TOUCHVL), *words, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: touchvl") and not list(tmp_path.iterdir())


def main_modules() -> list[str]:
    """Every module ``python -m`` can run: a ``__main__`` guard (tasks/*, flows/*, bench/*, touchvl/**), or a package
    with a ``__main__.py`` (``python -m touchvl``)."""
    found = []
    for name, path in modules().items():
        if name.endswith(".__main__"):
            found.append(name.removesuffix(".__main__"))
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
               for node in tree.body):
            found.append(name)
    return sorted(found)


# Runs each module as ``python -m NAME --help`` would (runpy, as __main__, argv patched) in one process: the heavy
# imports (torch, transformers, prefect, GX) are paid once, not once per module (measured: ~6 s for all of them,
# against ~45 s as one subprocess each on two cores).
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
names, results = sys.argv[1:], {}
for name in names:
    out, err, code = io.StringIO(), io.StringIO(), None
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:
        code = f"{type(exc).__name__}: {exc}"
    results[name] = {"code": code, "stdout": out.getvalue()[:400], "stderr": err.getvalue()[-400:]}
sys.__stdout__.write(json.dumps(results))
"""


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_main_modules_are_found():  # the test below checks them all: it must see the ones that matter
    names = main_modules()
    assert {"touchvl", "touchvl.cli", "tasks.prepare", "tasks.embed", "tasks.qa", "flows.pipeline", "bench.tokens"} <= set(names)
    assert len(names) >= 28


def test_every_python_m_entry_point_prints_help_and_does_nothing(tmp_path):
    """`python -m tasks.<stage> --help` used to run the stage (and bench.tokens read `--help` as a file name): every
    module with a __main__ guard prints its usage, exits 0, and writes nothing -- not in a copy of the project
    (where a stage would write artifacts/ or a benchmark bench/results/), not in $HOME."""
    import shutil

    repo, home = tmp_path / "repo", tmp_path / "home"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("touchvl", "tasks", "flows", "bench", "bin", "tests"):  # (benchmarks reuse tests' data makers)
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    for name in ("params.yaml", "dvc.yaml", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)
    home.mkdir()
    names = main_modules()
    before = _snapshot(repo, home)
    env = {"PYTHONPATH": str(repo), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "PYTHONDONTWRITEBYTECODE": "1", "PREFECT_HOME": str(tmp_path / "prefect"),  # prefect's own, on import
           "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, *names], cwd=repo, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    problems = {name: r for name, r in results.items() if r["code"] != 0 or not r["stdout"].startswith("usage:")}
    assert problems == {}
    assert _snapshot(repo, home) == before


def test_readme_cli_section_matches_the_parser():
    """The README's CLI section lists exactly the commands `touchvl --help` has."""
    from touchvl.cli import build_parser

    parser = build_parser()
    actions = next(a for a in parser._actions if a.dest == "command")
    commands = sorted(actions.choices)
    section = (ROOT / "README.md").read_text().split("## CLI", 1)[1].split("\n## ", 1)[0]
    listed = sorted(set(re.findall(r"^\| `touchvl ([\w-]+)", section, flags=re.M)))
    assert listed == commands


def test_readme_cli_rows_name_only_real_options_and_all_of_them():
    """Each command's README row names only options its parser has, and every one of them unless the row says
    ``[...]`` (more options: see --help); finetune's row lists exactly its subcommands."""
    import argparse

    from touchvl.cli import build_parser

    section = (ROOT / "README.md").read_text().split("## CLI", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `touchvl ([\w-]+)[^|]*(?:\\\|[^|]*)*`", section, flags=re.M)}
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, parser in commands.items():
        row = rows[name]
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        listed = set(re.findall(r"--[\w-]+", row))
        assert listed <= options, (name, listed - options)
        if "[...]" not in row:
            assert options <= listed, (name, options - listed)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            assert set(re.findall(r"(\w+)(?:\\\||`)", row.split(name, 1)[1])) == set(subs[0].choices), name
