"""Smoke pretraining of the tiny ImageBind (the ``pretrain_smoke`` stage's core; data in, weights out, no I/O).

A random-weight ViT keeps almost nothing of an image's texture, so every offline result was at chance. Real
ImageBind is an image-text model trained on web photos and captions, never on tactile frames. This gives the
tiny config the same kind of knowledge in about a minute of CPU: its vision and text towers are trained on
the *training split's RGB photos and their captions only* (never a tactile image, never a test id), with

* a CLIP-style InfoNCE between each photo and its caption (captions repeat across ids, so every photo whose
  caption is the same string is a positive: a multi-positive target, not a false negative), and
* an instance term between two copies of the same photo (prepare's augmented copies of one source id): it
  keeps what tells two photos apart (orientation, scale, colour), as web-scale pretraining does.

The tactile frames stay out of distribution for the result, as they are for Meta's weights: the modality gap
the projector has to close. Deterministic for a seed on one machine and thread count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from touchvl.adamw import AdamW
from touchvl.errors import StageError
from touchvl.imagebind.encoder import preprocess_image, tokenize


class PretrainError(StageError):
    pass


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 30
    batch_size: int = 64
    """Source ids per step (each gives two photos and a caption)."""
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    tau: float = 0.07
    instance_weight: float = 1.0
    """Weight of the photo-photo instance term beside the photo-caption term."""
    grayscale_p: float = 0.0
    """Probability that a training view is turned grey (colour is not texture: features that survive it are
    about relief and pattern, the part of a photo a tactile frame shares)."""
    low_contrast_p: float = 0.0
    """Probability that a view's contrast is scaled down (by 0.25-1): relief seen faintly is the same relief."""
    crop_scale: tuple[float, float] = (1.0, 1.0)
    """Side of a random square crop (fraction of the image), resized back: a patch seen closer is the same
    surface, the way a gel sees a magnified patch of what the photo shows whole."""
    val_fraction: float = 0.15
    """Training source ids held out to watch the curve (photo->photo and caption->photo); test ids never."""
    seed: int = 0


@dataclass
class PretrainData:
    """Preprocessed photos (``[N, 3, 224, 224]``) with the source id and caption of each."""

    pixels: torch.Tensor
    source_ids: np.ndarray
    captions: list[str]
    tokens: torch.Tensor  # [N, 77] caption token ids

    def __post_init__(self):
        n = len(self.pixels)
        if not (len(self.source_ids) == len(self.captions) == len(self.tokens) == n):
            raise ValueError("pixels, source_ids, captions and tokens must have one row per photo")


@dataclass
class PretrainResult:
    state_dict: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    """One row per epoch: loss, learning rate, validation photo->photo R@1, caption->photo precision@1."""
    train_sources: int = 0
    val_sources: int = 0
    photos: int = 0


def training_photos(manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows smoke pretraining may see: the training split's RGB photos and captions (all copies).

    Prepare splits by source id, so no training row shares a source with a test row; checked here anyway,
    because a test id in pretraining would inflate every retrieval figure downstream without a trace.
    """
    train = manifest[manifest["split"] == "train"]
    leaked = sorted(set(train["source_id"]) & set(manifest.loc[manifest["split"] != "train", "source_id"]))
    if leaked:
        raise PretrainError(f"source ids in both the training and the test split: {leaked[:10]} "
                            f"({len(leaked)} in all); smoke pretraining refuses to train on test ids")
    if train.empty:
        raise PretrainError("the manifest has no training rows: nothing to pretrain the smoke encoder on")
    return train


def load_photos(rows: pd.DataFrame, progress: bool = True) -> PretrainData:
    """Decode and preprocess the rows' RGB photos (Meta's transform, as embed) and tokenize their captions."""
    pixels = []
    for path, uid in tqdm(zip(rows["rgb_path"], rows["uid"]), total=len(rows), desc="load training photos",
                          unit="img", disable=not progress):
        try:
            with Image.open(path) as img:
                pixels.append(preprocess_image(img))
        except OSError as exc:
            raise PretrainError(f"{path} (uid {uid}): cannot be decoded ({exc})") from None
    captions = rows["caption"].astype(str).tolist()
    return PretrainData(torch.stack(pixels), rows["source_id"].to_numpy(np.int64), captions, tokenize(captions))


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _soft_clip_loss(images: torch.Tensor, texts: torch.Tensor, same_caption: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with the same caption string is a positive."""
    logits = images @ texts.T / tau
    target = same_caption / same_caption.sum(dim=1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, dim=1), dim=1).mean())


def _instance_loss(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    logits = a @ b.T / tau
    labels = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def _augment(pixels: torch.Tensor, config: PretrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Photometric augmentation of normalised views: grey out a random subset (ITU-R 601 luma, as torchvision's
    Grayscale) and lower the contrast of another; geometry is left alone (orientation and scale are content)."""
    grey_p, low_p = config.grayscale_p, config.low_contrast_p
    if grey_p <= 0 and low_p <= 0 and config.crop_scale[0] >= 1.0:
        return pixels
    # in place, one image at a time for the grey ones: the same float operations on every element in the same
    # order as the out-of-place version (IEEE + and * are commutative), so the same bits -- and the same weights
    # from the same seed (tests/test_smoke_encoder.py) -- at a quarter of the time (no 77 MB temporaries, no
    # boolean-mask gathers and scatters; it was a third of the stage)
    rgb = torch.mul(pixels, _STD).add_(_MEAN)
    grey = rng.random(len(pixels)) < grey_p
    for i in np.flatnonzero(grey).tolist():
        view = rgb[i]
        luma = (0.299 * view[0]).add_(0.587 * view[1]).add_(0.114 * view[2])  # ITU-R 601, as Grayscale
        view.copy_(luma.expand(3, -1, -1))
    low = rng.random(len(pixels)) < low_p
    factor = torch.from_numpy(np.where(low, rng.uniform(0.25, 1.0, len(pixels)), 1.0)).float().view(-1, 1, 1, 1)
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    rgb.sub_(mean).mul_(factor).add_(mean)  # mean + (rgb - mean) * factor
    random_crops_(rgb, config.crop_scale, rng)
    return rgb.sub_(_MEAN).div_(_STD)


def random_crops_(rgb: torch.Tensor, crop_scale: tuple[float, float], rng: np.random.Generator) -> None:
    """In place: each view replaced by a random square crop (side a ``crop_scale`` fraction) resized back."""
    lo, hi = crop_scale
    if lo < 1.0:
        size = rgb.shape[-1]
        for i, side in enumerate(rng.uniform(lo, hi, len(rgb))):
            crop = max(8, int(round(side * size)))
            top, left = rng.integers(0, size - crop + 1, 2)
            patch = rgb[i:i + 1, :, top:top + crop, left:left + crop]
            rgb[i] = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)[0]


def _encode(model: torch.nn.Module, modality: str, inputs: torch.Tensor) -> torch.Tensor:
    return F.normalize(model({modality: inputs})[modality].float(), dim=-1)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, data: PretrainData, rows_by_source: dict[int, np.ndarray],
              sources: list[int]) -> dict:
    """Photo->photo R@1 (first copy queries the others) and caption->photo precision@1 on ``sources``."""
    if len(sources) < 2:
        return {}
    model.eval()
    first = np.array([rows_by_source[s][0] for s in sources])
    second = np.array([rows_by_source[s][1 % len(rows_by_source[s])] for s in sources])
    ga, gb = _encode(model, "vision", data.pixels[first]), _encode(model, "vision", data.pixels[second])
    photo_r1 = float((torch.argmax(ga @ gb.T, dim=1) == torch.arange(len(sources))).float().mean())
    texts = _encode(model, "text", data.tokens[first])
    best = torch.argmax(texts @ ga.T, dim=1).numpy()
    caption_p1 = float(np.mean([data.captions[first[j]] == data.captions[first[i]] for i, j in enumerate(best)]))
    model.train()
    return {"val_photo_r1": photo_r1, "val_caption_p1": caption_p1}


def pretrain(model: torch.nn.Module, data: PretrainData, config: PretrainConfig,
             progress: bool = True) -> PretrainResult:
    """Train ``model``'s vision and text towers in place on ``data``; returns the weights and the curve."""
    rng = np.random.default_rng(config.seed)
    rows_by_source: dict[int, np.ndarray] = {}
    for row, source in enumerate(data.source_ids.tolist()):
        rows_by_source.setdefault(int(source), []).append(row)
    rows_by_source = {s: np.array(r) for s, r in rows_by_source.items()}
    sources = sorted(rows_by_source)
    shuffled = rng.permutation(sources).tolist()
    n_val = int(round(len(sources) * config.val_fraction)) if len(sources) >= 10 else 0
    val_sources, train_sources = sorted(shuffled[:n_val]), shuffled[n_val:]
    if len(train_sources) < 2:
        raise ValueError(f"smoke pretraining needs at least 2 training source ids, got {len(train_sources)}")
    batch = min(config.batch_size, len(train_sources))
    steps_per_epoch = max(1, len(train_sources) // batch)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(round(config.warmup_epochs * steps_per_epoch)))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = AdamW([{"params": decay, "weight_decay": config.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    model.train()
    history: list[dict] = []
    step = 0
    bar = tqdm(total=total, desc="pretrain smoke encoder", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        order = rng.permutation(train_sources)
        losses = []
        for k in range(steps_per_epoch):
            chosen = order[k * batch:(k + 1) * batch]
            pairs = [rng.choice(rows_by_source[s], size=2, replace=len(rows_by_source[s]) < 2) for s in chosen]
            a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            lr = _lr_at(step, total, warmup, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            views = _augment(data.pixels[np.concatenate([a, b])], config, rng)
            images = _encode(model, "vision", views)
            ia, ib = images[:len(a)], images[len(a):]
            texts = _encode(model, "text", data.tokens[a])
            caps = [data.captions[i] for i in a]
            same = torch.tensor([[ci == cj for cj in caps] for ci in caps], dtype=torch.float32)
            loss = 0.5 * (_soft_clip_loss(ia, texts, same, config.tau) + _soft_clip_loss(ib, texts, same, config.tau))
            loss = loss + config.instance_weight * _instance_loss(ia, ib, config.tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": lr,
               **_evaluate(model, data, rows_by_source, val_sources)}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", photo_r1=f"{row.get('val_photo_r1', float('nan')):.2f}")
    bar.close()
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return PretrainResult(state, history, len(train_sources), len(val_sources), len(data.pixels))
