"""The real DVC pipeline in a throwaway git repo: no-op rerun, forced rerun, experiments, param change reruns what
depends on it (:func:`check_dvc_cli_on_a_built_repo`, run by tests/test_flows.py on the repo its build flow made),
and a params typo failing the stage.

DVC is called as ``.venv/bin/dvc`` with the venv NOT on PATH (as the README tells users): the stage commands
(``bin/stage``) find the project's interpreter themselves.
"""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


PATH_WITHOUT_VENV = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN)


def sh(*args, cwd):
    if args[0] == "dvc":
        args = (str(BIN / "dvc"), *args[1:])
    env = {**os.environ, "PATH": PATH_WITHOUT_VENV, "DVC_NO_ANALYTICS": "1"}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def make_repo(work: Path) -> Path:
    """A git + DVC repo of the project's code and a small params set (40 ids, tiny models) at ``work``."""
    work.mkdir(parents=True)
    for name in ("tasks", "touchvl", "bin", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / name)
    (work / ".venv").symlink_to(Path(sys.prefix))  # the project's venv, found by bin/stage
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"]["n_ids"] = 40
    params["sample"]["image_size"] = 48
    params["prepare"]["augment"]["copies"] = 1
    params["projector"].update(dim=32, depth=1, val_fraction=0.2)
    params["pretrain_smoke"].update(epochs=2, batch_size=16)
    params["train_stage1"].update(epochs=2, batch_size=16)
    params["train_stage2"].update(epochs=1, batch_size=16)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        assert sh(*cmd, cwd=work).returncode == 0, cmd
    return work


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "repo")


def check_dvc_cli_on_a_built_repo(repo: Path) -> None:
    """What a user does with ``.venv/bin/dvc`` (the venv not on PATH) once the pipeline is built: its outputs are
    all there and validated, ``dvc repro`` finds nothing to do, ``dvc repro --force`` runs every stage again from
    the command line and writes the same bytes, the curves render offline, two experiments compare, and a param
    change reruns what depends on it. tests/test_flows.py runs it on a copy of the repo its build flow made (the
    flow runs ``dvc repro --single-item`` per stage): one build of the pipeline serves both, and the forced CLI
    rerun must reproduce the flow's outputs byte for byte."""
    manifest = pd.read_csv(repo / "data/prepared/manifest.csv")
    assert manifest["source_id"].nunique() == 40
    for stage in ("sample", "prepare", "embed", "train_projector_stage1", "train_projector_stage2", "index", "upload",
                  "jsonl", "finetune", "evaluate"):
        assert json.loads((repo / f"artifacts/reports/validation/{stage}.json").read_text())["success"]
    assert (repo / "artifacts/reports/prepare/quarantine.csv").is_file()
    assert len(np.load(repo / "embeddings/embeddings_tac_projected/all_indices.npy")) == len(manifest)
    assert (repo / "artifacts/index/rgb.faiss").is_file() and (repo / "artifacts/reports/retrieval_gallery.html").is_file()
    assert "projected" in json.loads((repo / "artifacts/metrics/projector.json").read_text())
    assert len(pd.read_csv(repo / "artifacts/upload/image_url_mapping.csv")) == len(manifest)
    for name in ("rgb_tac_train", "rgb_tac_val", "tactile_train", "tactile_val"):
        report = json.loads((repo / f"artifacts/jsonl/reports/{name}/report.json").read_text())
        assert report["ok"] and report["expectations"] and all(e["success"] for e in report["expectations"])
    quotas = json.loads((repo / "artifacts/jsonl/reports/tactile_train/report.json").read_text())["composition"]["quotas"]
    assert all(q["exact"] for q in quotas.values())
    plan = json.loads((repo / "artifacts/finetune/plan.json").read_text())
    assert plan["submit"] is False and plan["files"]["train"]["errors"] == 0 and not (repo / "artifacts/finetune/job.json").exists()
    assert (repo / "dvc.lock").is_file()

    again = sh("dvc", "repro", cwd=repo)  # DVC's CLI sees the build as fresh
    assert again.returncode == 0 and "Data and pipelines are up to date" in again.stdout

    # same inputs on the same machine, every stage run again from its inputs by the CLI: the same bytes in dvc.lock
    def hashes():
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        return {(stage, o["path"]): o.get("md5") for stage, s in lock.items() for o in s.get("outs", [])}

    before = hashes()
    forced = sh("dvc", "repro", "--force", cwd=repo)
    assert forced.returncode == 0, forced.stderr
    assert hashes() == before
    # ... and, the content being identical, every stage's validation replays its passing run without importing
    # Great Expectations (validation.replay_dir; a changed byte or a failure validates for real:
    # tests/test_validation_replay.py)
    replayed = {line.split("validation ", 1)[1].split(":", 1)[0] for line in (forced.stdout + forced.stderr).splitlines()
                if "replayed the passing run" in line}
    assert replayed == {"sample", "prepare", "embed", "train_projector_stage1", "train_projector_stage2", "index",
                        "upload", "jsonl", "finetune", "evaluate"}, replayed

    # the curves render offline: every plot as a PNG and one page with Vega inline (no CDN)
    plots = sh(str(BIN / "python"), "-m", "touchvl", "plots", cwd=repo)
    assert plots.returncode == 0, plots.stderr
    rendered = {p.name for p in (repo / "artifacts/reports/plots").iterdir()}
    for curve in ("train_loss", "val_R_1", "tau", "lr"):
        assert f"projector_stage1_{curve}.png" in rendered and f"projector_stage2_{curve}.png" in rendered
    page = (repo / "artifacts/reports/plots/index.html").read_text()
    assert "vegaEmbed(" in page and "cdn.jsdelivr" not in page and "<script src=" not in page

    # experiments compare: metrics are cached outputs that a commit and an experiment both keep.  The issue's
    # own loop: more projector epochs, then compare retrieval; a second experiment changes only the answers.
    assert sh("git", "add", "-A", cwd=repo).returncode == 0
    assert sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline", cwd=repo).returncode == 0
    longer = sh("dvc", "exp", "run", "-n", "longer", "-S", "train_stage1.epochs=4", cwd=repo)
    assert longer.returncode == 0, longer.stderr + longer.stdout
    assert "Running stage 'train_projector_stage1'" in longer.stdout and "Running stage 'index'" in longer.stdout
    assert "Running stage 'embed'" not in longer.stdout
    # a workspace experiment leaves its params and outputs in the workspace: back to the baseline commit first
    assert sh("git", "checkout", "--", "params.yaml", "dvc.lock", cwd=repo).returncode == 0
    restored = sh("dvc", "checkout", "--force", cwd=repo)
    assert restored.returncode == 0, restored.stderr
    k1 = sh("dvc", "exp", "run", "-n", "k1", "-S", "evaluate.retrieval_k=1", cwd=repo)
    assert k1.returncode == 0, k1.stderr + k1.stdout
    assert "Running stage 'evaluate'" in k1.stdout and "Running stage 'train_projector_stage1'" not in k1.stdout

    def metric_diff(a, b, *flags):
        diff = sh("dvc", "exp", "diff", a, b, "--json", *flags, cwd=repo)
        assert diff.returncode == 0, diff.stderr
        return json.loads(diff.stdout)["metrics"]

    # the retrieval metrics of both runs, side by side (R@1 on 8 test ids may well not move with 2 more epochs,
    # so --all: unchanged metrics are listed too)
    both = metric_diff("HEAD", "longer", "--all")["artifacts/metrics/retrieval.json"]
    for key in ("raw_r1", "proj_r1"):
        assert isinstance(both[key]["old"], float) and isinstance(both[key]["new"], float), both
    # a metric change reported: top-1 neighbours answer instead of top-k
    changed = metric_diff("HEAD", "k1")
    assert "artifacts/metrics/answers.json" in changed, changed
    assert any(v["old"] != v["new"] for v in changed["artifacts/metrics/answers.json"].values()), changed
    assert "artifacts/metrics/answers.json" in metric_diff("longer", "k1")  # two experiments compared directly
    shown = sh("dvc", "exp", "show", "--csv", cwd=repo)
    assert shown.returncode == 0, shown.stderr
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert {"longer", "k1"} <= {r["Experiment"] for r in rows}
    for row in rows:  # every metric of every run loaded: DVC shows "!" for a metric it could not read
        assert row["proj_r1"] not in ("", "!") and row["adj_f1"] not in ("", "!"), row
    assert sh("dvc", "metrics", "diff", "HEAD", cwd=repo).returncode == 0
    # the headline set: few numeric metrics, one small file per question, readable on a screen
    shown = sh("dvc", "metrics", "show", cwd=repo)
    assert shown.returncode == 0 and "failed to load" not in shown.stdout + shown.stderr, shown.stderr
    assert max(len(line) for line in shown.stdout.splitlines()) <= 160, shown.stdout
    for key in ("pairs", "quar", "text_p5", "cone", "raw_r1", "proj_r1", "adj_f1", "const_f1", "meteor"):
        assert key in shown.stdout, key
    assert sh("dvc", "plots", "diff", "HEAD", "--json", cwd=repo).returncode == 0

    # a param change reruns what depends on it (prepare and embed here), and DVC then knows everything after
    # them is stale; the whole chain is not rerun to save the test's time (the experiments above rerun parts)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["augment"]["copies"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    changed = sh("dvc", "repro", "embed", cwd=repo)
    assert changed.returncode == 0, changed.stderr
    assert "Stage 'sample' didn't change, skipping" in changed.stdout
    assert "Running stage 'prepare'" in changed.stdout
    assert "Running stage 'embed'" in changed.stdout
    assert len(pd.read_csv(repo / "data/prepared/manifest.csv")) > len(manifest)
    status = sh("dvc", "status", "--json", cwd=repo)
    stale = set(json.loads(status.stdout))
    assert {"train_projector_stage1", "index", "upload", "jsonl", "evaluate"} <= stale, stale
    assert not {"sample", "prepare", "embed"} & stale, stale


def test_params_typo_fails_the_stage_with_the_key_name(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["max_bad_fracton"] = 0.2
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = sh("dvc", "repro", cwd=repo)
    assert proc.returncode != 0
    assert "unknown key 'prepare.max_bad_fracton'" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
