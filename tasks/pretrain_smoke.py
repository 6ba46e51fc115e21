"""DVC stage ``pretrain_smoke``: give the tiny smoke encoder real image and text features before ``embed``.

With ``embed.encoder: imagebind_tiny`` (and not ``embed.random_weights``), trains the tiny ImageBind's vision and
text towers on the training split's RGB photos and captions of ``data/prepared/manifest.csv`` -- never a tactile
image, never a test id -- and writes ``<embed.smoke_dir>/imagebind_tiny.pt`` (a plain state dict: the format
``embed`` loads for Meta's weights, through the same code), ``pretrain.json`` (config, counts, curve), the metrics
``artifacts/metrics/pretrain_smoke.json`` and dvclive curves. With a real encoder it writes only a note saying so.
(core: touchvl.imagebind.pretrain)
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

import torch

from touchvl import disk
from touchvl.devices import apply_threads
from touchvl.imagebind.encoder import SMOKE_CHECKPOINT_NAME, EncoderSpec, build_model, smoke_checkpoint_path
from touchvl.imagebind.pretrain import PretrainConfig, load_photos, pretrain, training_photos
from touchvl.logs import run_stage
from touchvl.params import Params

log = logging.getLogger(__name__)


@contextlib.contextmanager
def curves(folder: Path):
    """dvclive curves by epoch (declared as DVC plots; no timestamps: same inputs, same bytes)."""
    from dvclive import Live

    shutil.rmtree(folder, ignore_errors=True)
    with Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None, monitor_system=False) as live:
        def log_epoch(row: dict) -> None:
            live.step = row["epoch"]
            live.log_metric("train/loss", row["loss"])
            live.log_metric("lr", row["lr"])
            for key in ("val_photo_r1", "val_caption_p1"):
                if key in row:
                    live.log_metric(f"val/{key[4:]}", row[key])

        yield log_epoch


def run(params: Params) -> dict:
    p, embed = params.pretrain_smoke, params.embed
    target = smoke_checkpoint_path(embed)
    with disk.replace_dir(embed.smoke_dir) as staging:
        if target is None:
            reason = ("embed.encoder is imagebind_huge (Meta's weights)" if embed.encoder != "imagebind_tiny"
                      else "embed.random_weights is true" if embed.random_weights
                      else f"embed.checkpoint is set ({embed.checkpoint})")
            disk.write_json(staging / "pretrain.json", {"pretrained": False, "reason": reason})
            metrics = {"pretrained": 0}
        else:
            apply_threads(p.threads)
            rows = training_photos(disk.read_manifest(params.prepare.out_dir / "manifest.csv"))
            data = load_photos(rows)
            config = PretrainConfig(**p.model_dump(exclude={"threads", "metrics", "curves_dir"}))
            model = build_model(EncoderSpec(name=embed.encoder, seed=embed.seed))
            started = time.perf_counter()
            result = pretrain(model, data, config)
            seconds = time.perf_counter() - started
            with curves(p.curves_dir) as log_epoch:
                for row in result.history:
                    log_epoch(row)
            disk.write_checkpoint(staging / SMOKE_CHECKPOINT_NAME, result.state_dict)
            last = result.history[-1]
            disk.write_json(staging / "pretrain.json", {
                "pretrained": True, "encoder": embed.encoder, "config": config.__dict__,
                "photos": result.photos, "train_sources": result.train_sources, "val_sources": result.val_sources,
                "source_ids": sorted(int(s) for s in set(rows["source_id"])), "history": result.history})
            metrics = {"pretrained": 1, "photos": result.photos, "loss": round(last["loss"], 4),
                       **{k: round(v, 4) for k, v in last.items() if k.startswith("val_")}}
            log.info("smoke encoder pretrained on %d training photos of %d source ids in %.0f s (loss %.3f)",
                     result.photos, result.train_sources + result.val_sources, seconds, last["loss"])
    disk.write_json(p.metrics, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    run_stage("pretrain_smoke", __doc__, lambda params, args: run(params), argv)


if __name__ == "__main__":
    main()
