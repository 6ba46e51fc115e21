"""Can a briefly self-supervised tiny ImageBind stand in for real weights? Measured, not asserted.

Random ImageBind weights keep almost nothing of an image's texture (a random ViT's CLS token mostly
averages linear patch features, i.e. mean colour), so the projector has nothing to align. Real runs
use Meta's ``imagebind_huge``, a general-purpose encoder never shown a tactile/photo pair. This bench
trains the tiny vision tower the same way in spirit -- SimCLR instance discrimination within single
images of the *train* split (two augmented views of one image are positives), never a tactile image
next to its own photo -- then embeds every image with it and runs the projector evaluation of
``bench.projector_ceiling`` (same rows, same ``train_stage1`` params) on the result.

    .venv/bin/python -m bench.ssl_encoder [--epochs 15] [--modalities rgb] [--dim 32]   # after make repro
Writes bench/results/ssl_encoder_<modalities>_<epochs>.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from touchvl.imagebind.encoder import CLIP_MEAN, CLIP_STD
from touchvl.projector.training import _lr_factor as lr_factor  # warm-up + cosine, as the projector


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    tau: float = 0.2
    crop_scale: tuple[float, float] = (0.5, 1.0)
    color_jitter: float = 0.6
    grayscale_p: float = 0.5
    seed: int = 0
    device: str = "cpu"


def view_transform(config: PretrainConfig) -> v2.Compose:
    """One random view of a [3, 224, 224] uint8 image, CLIP-normalised.

    Crops and colour changes only: flips and rotations would teach the encoder to ignore a pattern's
    orientation, which is what tells many sample items apart.  Strong colour jitter and grayscale
    stop it from discriminating RGB images by their colour alone (SimCLR's colour shortcut).
    """
    j = config.color_jitter
    return v2.Compose([
        v2.RandomResizedCrop(224, scale=config.crop_scale, ratio=(0.8, 1.25), antialias=True),
        v2.RandomApply([v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 4, 0.5))], p=0.8),
        v2.RandomGrayscale(p=config.grayscale_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ])


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of the same image, the 2B-2 others negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T / tau
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def pretrain_vision(model: torch.nn.Module, images: torch.Tensor, config: PretrainConfig,
                    log: Callable[[dict], None] | None = None, progress: Callable | None = None) -> list[dict]:
    """Train ``model``'s vision tower in place on ``images`` ([N, 3, 224, 224] uint8); returns per-epoch rows.

    Only the vision preprocessor, trunk, head and postprocessor receive gradients; the text tower is
    left as it is.  Deterministic for a given seed on one device.
    """
    if images.ndim != 4 or images.shape[1:] != (3, 224, 224) or images.dtype != torch.uint8:
        raise ValueError(f"images must be [N, 3, 224, 224] uint8, got {tuple(images.shape)} {images.dtype}")
    batch = min(config.batch_size, len(images))
    if batch < 2:
        raise ValueError(f"need at least 2 images for contrastive pretraining, got {len(images)}")
    device = torch.device(config.device)
    model.to(device).train()
    params = [p for name, p in model.named_parameters() if ".vision." in f".{name}"]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(images) // batch  # drop the last partial batch: every step sees `batch` negatives
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    transform = view_transform(config)
    generator = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)  # the transforms draw from torch's global RNG
    history, step = [], 0
    for epoch in range(config.epochs):
        order = generator.permutation(len(images))
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            views = [torch.stack([transform(images[i]) for i in idx]).to(device) for _ in range(2)]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, total, warmup, 0.0)
            z1 = model({"vision": views[0]})["vision"]
            z2 = model({"vision": views[1]})["vision"]
            loss = nt_xent(z1, z2, config.tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(1, loss=losses[-1])
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": config.lr * lr_factor(step - 1, total, warmup, 0.0)}
        history.append(row)
        if log:
            log(row)
    model.eval()
    return history


def _load_224_uint8(path: str) -> torch.Tensor:
    from PIL import Image

    image = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


@torch.inference_mode()
def _embed(model: torch.nn.Module, paths, batch: int = 32) -> np.ndarray:
    from PIL import Image

    from touchvl.imagebind.encoder import preprocess_image

    out = []
    for start in range(0, len(paths), batch):
        pixels = torch.stack([preprocess_image(Image.open(p)) for p in paths[start:start + batch]])
        out.append(F.normalize(model({"vision": pixels})["vision"], dim=-1).numpy())
    return np.concatenate(out)


def main() -> None:
    import argparse
    import json
    import time
    from pathlib import Path

    import pandas as pd
    from tqdm import tqdm

    from bench.projector_ceiling import evaluate
    from touchvl import disk
    from touchvl.imagebind.encoder import EncoderSpec, build_model
    from touchvl.params import load_params
    from touchvl.projector.pairs import PairedEmbeddings, load_pairs

    ap = argparse.ArgumentParser(prog="python -m bench.ssl_encoder")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--modalities", default="rgb", help="rgb (photos only, like ImageBind's corpus) or tac,rgb")
    ap.add_argument("--dim", type=int, default=32, help="out_embed_dim of the tiny tower")
    args = ap.parse_args()
    params = load_params()
    pairs = load_pairs(params.embed.out_dir, disk.read_manifest(params.prepare.out_dir / "manifest.csv"), params.projector.val_fraction)
    manifest = pd.read_csv(params.prepare.out_dir / "manifest.csv", keep_default_na=False).set_index("uid")
    rows = manifest.loc[pairs.uids]
    train_rows = rows[pairs.split == "train"]
    images = torch.stack([_load_224_uint8(p) for m in args.modalities.split(",")
                          for p in tqdm(train_rows[f"{m}_path"], desc=f"load {m}")])
    model = build_model(EncoderSpec(seed=params.embed.seed, config_overrides=(("out_embed_dim", args.dim),)))
    started = time.perf_counter()
    with tqdm(total=args.epochs * (len(images) // min(64, len(images))), desc="simclr") as bar:
        history = pretrain_vision(model, images, PretrainConfig(epochs=args.epochs),
                                  progress=lambda n, loss: (bar.update(n), bar.set_postfix(loss=f"{loss:.3f}")))
    seconds = time.perf_counter() - started
    data = PairedEmbeddings(**{**pairs.__dict__, "tac": _embed(model, list(rows["tac_path"])),
                               "rgb": _embed(model, list(rows["rgb_path"])), "text": None})
    result = evaluate(data, params, "cpu")
    report = {"epochs": args.epochs, "modalities": args.modalities, "dim": args.dim, "train_images": len(images),
              "pretrain_s": round(seconds, 1), "final_loss": history[-1]["loss"], "raw": result["raw"],
              "projected": result["projected"], "best_val_r1": result["best_val_r1"]}
    print(json.dumps(report, indent=2))
    disk.write_json(Path(f"bench/results/ssl_encoder_{args.modalities.replace(',', '_')}_{args.epochs}.json"), report)


if __name__ == "__main__":
    main()
