"""DVC stages ``train_projector_stage1`` (InfoNCE) and ``train_projector_stage2`` (low-LR polish with EMA).

    python -m tasks.train_projector --stage 1   # -> artifacts/projector/stage1.pt, per-epoch history
    python -m tasks.train_projector --stage 2   # -> artifacts/projector/projector.pt,
                                                #    embeddings/embeddings_tac_projected/, metrics

Pairs are matched by uid; early stopping uses ``projector.val_fraction`` of the *train* source ids; the test
split only ever feeds the reported metrics (core: touchvl.projector).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import torch

from touchvl import disk, headline
from touchvl.devices import apply_threads, resolve_device
from touchvl.errors import StageError
from touchvl import checks  # light: Great Expectations is imported only when it runs
from touchvl.logs import run_stage
from touchvl.params import Params
from touchvl.projector.model import ProjectorConfig, ViTProjector, checkpoint_dict, projector_from_checkpoint
from touchvl.projector.pairs import (PairedEmbeddings, fit, load_pairs, stage1_validation_tables, test_metrics,
                                    validation_tables)
from touchvl.projector.training import project

log = logging.getLogger(__name__)


@contextlib.contextmanager
def curves(folder: Path):
    """dvclive, the DVC-native logger: one TSV per curve (train/loss, val/R@1, tau, lr by epoch) under
    ``folder``, declared as DVC plots in dvc.yaml (no timestamps: same inputs, same bytes)."""
    from dvclive import Live

    shutil.rmtree(folder, ignore_errors=True)  # a rerun's curve starts afresh, never appended to the last one's
    with Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None, monitor_system=False) as live:
        def log_epoch(row: dict) -> None:
            live.step = row["epoch"]
            live.log_metric("train/loss", row["loss"])
            live.log_metric("val/R@1", row["val_r1"])
            live.log_metric("tau", row["tau"])
            live.log_metric("lr", row["lr"])

        yield log_epoch


def pairs(params: Params) -> PairedEmbeddings:
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    return load_pairs(params.embed.out_dir, manifest, params.projector.val_fraction)


def run_stage1(params: Params) -> dict:

    p = params.projector
    data = pairs(params)
    device = resolve_device(p.device, "projector.device")
    apply_threads(p.threads)
    num_sensors = p.num_sensors if p.num_sensors is not None else int(max(data.sensors.max(), -1) + 1)
    torch.manual_seed(params.train_stage1.seed)
    model = ViTProjector(ProjectorConfig(emb_dim=data.tac.shape[1], dim=p.dim, depth=p.depth, heads=p.heads,
                                         num_tokens=p.num_tokens, mlp_ratio=p.mlp_ratio, dropout=p.dropout,
                                         num_sensors=num_sensors, sensor_tokens=p.sensor_tokens))
    with curves(p.history_dir / "projector_stage1") as on_epoch:
        result = fit(model, data, params.train_stage1, device, on_epoch)
    if result.best_state:  # none when no epoch had a finite val_r1: validation below says so, naming the epochs
        model.load_state_dict(result.best_state)
    ckpt = checkpoint_dict(model, stage=1, best_epoch=result.best_epoch, best_val_r1=result.best_val_r1,
                           encoder_fingerprint=data.encoder_fingerprint)
    # validated before anything is written: stage 2 and every query trust this checkpoint's geometry
    checks.run_validation("train_projector_stage1", stage1_validation_tables(
        result.history, ckpt["state_dict"], data.tac.shape[1], ckpt["config"]["emb_dim"], ckpt["encoder_fingerprint"],
        disk.read_meta(params.embed.out_dir)["fingerprint"], result.best_val_r1), params.validation).raise_if_failed()
    disk.write_checkpoint(p.out_dir / "stage1.pt", ckpt)
    return {"best_epoch": result.best_epoch, "best_val_r1": result.best_val_r1}


def run_stage2(params: Params) -> dict:

    p = params.projector
    # a killed run's half-written temporaries, before DVC could record them as part of an output
    disk.remove_stale_temps(p.projected_dir, p.out_dir / "projector.pt", p.metrics, p.headline,
                            *checks.report_paths("train_projector_stage2", params.validation))
    data = pairs(params)
    device = resolve_device(p.device, "projector.device")
    apply_threads(p.threads)
    stage1 = disk.read_checkpoint(p.out_dir / "stage1.pt", "train_projector_stage1")
    if stage1["config"]["emb_dim"] != data.tac.shape[1]:
        raise StageError(f"stage-1 projector expects dim {stage1['config']['emb_dim']}, embeddings have {data.tac.shape[1]}")
    model = projector_from_checkpoint(stage1)
    with curves(p.history_dir / "projector_stage2") as on_epoch:
        result = fit(model, data, params.train_stage2, device, on_epoch)
    if result.best_state:  # none when no epoch had a finite val_r1: validation below says so, naming the epochs
        model.load_state_dict(result.best_state)
    projected = project(model, data.tac, data.sensors, device=device)
    _, raw_ids = disk.read_vectors(params.embed.out_dir / "embeddings_tac")
    # validated before anything is written: a NaN loss or val_r1 in the curve is a failed run, not a projector
    checks.run_validation("train_projector_stage2", validation_tables(projected, data.uids, raw_ids, result.history),
                          params.validation).raise_if_failed()
    disk.write_checkpoint(p.out_dir / "projector.pt", checkpoint_dict(
        model, stage=2, best_epoch=result.best_epoch, best_val_r1=result.best_val_r1,
        encoder_fingerprint=data.encoder_fingerprint))
    projector_hash = disk.sha256_file(p.out_dir / "projector.pt")[:16]
    disk.write_vectors(p.projected_dir, projected, data.uids, meta={
        "projector_hash": projector_hash, "projector": str(p.out_dir / "projector.pt"),
        "encoder_fingerprint": data.encoder_fingerprint, "dim": int(projected.shape[1]), "count": len(projected),
        "normalized": True})
    metrics = {"projector_hash": projector_hash, "stage1_val_r1": float(stage1.get("best_val_r1", -1)),
               "stage2_val_r1": result.best_val_r1, **test_metrics(data, projected)}
    disk.write_json(p.metrics, metrics)
    disk.write_json(p.headline, headline.retrieval(metrics))
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(params: Params, args) -> None:
        summary = run_stage1(params) if args.stage == 1 else run_stage2(params)
        log.info("stage %d: %s", args.stage, json.dumps(summary)[:400])

    run_stage("train_projector", __doc__, body, argv, start=checks.stage_starts,
              configure=lambda ap: ap.add_argument("--stage", type=int, choices=(1, 2), required=True))


if __name__ == "__main__":
    main()
