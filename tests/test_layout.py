"""The architecture, checked from the code: no import cycles, nothing imports a stage, dvc.yaml's code deps
cover every stage's import closure, and the CLI answers --help everywhere without doing any work."""
from __future__ import annotations

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


STAGES = ["sample", "prepare", "embed", "train_projector", "index", "upload", "jsonl", "finetune", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_prints_help_and_does_nothing(stage, tmp_path):
    """`python -m tasks.<stage> --help` used to run the stage; now it prints help and writes nothing."""
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", f"tasks.{stage}", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m tasks.{stage}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


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
