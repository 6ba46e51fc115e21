"""Training core for the ViT projector: InfoNCE, multi-sensor sampling, schedule, EMA, early stopping.

Pure functions on arrays: no files, no params.yaml (``tasks/train_projector.py`` does that).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from touchvl.adamw import AdamW
from touchvl.projector.model import ViTProjector
from touchvl.errors import StageError

TAU_RANGE = (0.01, 1.0)
"""Learnable temperature bounds: CLIP's logit-scale cap of 100 below, a near-uniform softmax above."""


class ProjectorDataError(StageError, ValueError):
    """Bad training inputs: a ValueError for callers, and a StageError so a stage prints it without a traceback."""


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` and row i of ``b`` are the positive pair."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _unit_rows(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_at_k(query: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, ks=(1, 5, 10),
                chunk: int = 1024) -> dict[str, float]:
    """Row i of ``query`` should retrieve row i of ``gallery`` (cosine).

    Ties count against the query (rank = gallery rows scoring at least the positive, minus itself),
    so a collapsed projector that maps everything to one vector scores 0, not 1.  Queries are scored
    ``chunk`` rows at a time to bound memory on large splits.
    """
    q, g = _unit_rows(query), _unit_rows(gallery)
    if q.shape != g.shape:
        raise ValueError(f"query {q.shape} and gallery {g.shape} must have the same shape (row i pairs with row i)")
    ranks = []
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ g.T
        rows = np.arange(len(sims))
        positive = sims[rows, start + rows][:, None]
        ranks.append((sims >= positive).sum(axis=1) - 1)
    rank = np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
    return {f"R@{k}": float(np.mean(rank < k)) if len(rank) else 0.0 for k in ks}


def align_by_ids(tac_ids: np.ndarray, rgb_ids: np.ndarray, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(tac_rows, rgb_rows)`` pairing equal uids -- positives are matched by id, never by position.

    Pairs come in tactile row order.  ``strict``: the two id sets must be equal; otherwise ids present
    on one side only are left out.  Duplicate ids are always an error (the pairing would be ambiguous).
    """
    tac_ids, rgb_ids = np.asarray(tac_ids), np.asarray(rgb_ids)
    for name, ids in (("tactile", tac_ids), ("rgb", rgb_ids)):
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ProjectorDataError(f"{name} ids are not unique: {int((counts > 1).sum())} repeated "
                                     f"(e.g. {values[counts > 1][:5].tolist()})")
    if strict:
        only_tac = np.setdiff1d(tac_ids, rgb_ids)
        only_rgb = np.setdiff1d(rgb_ids, tac_ids)
        if len(only_tac) or len(only_rgb):
            raise ProjectorDataError(
                f"tactile and RGB ids differ: {len(only_tac)} only in tactile (e.g. {only_tac[:5].tolist()}), "
                f"{len(only_rgb)} only in RGB (e.g. {only_rgb[:5].tolist()})")
    _, tac_rows, rgb_rows = np.intersect1d(tac_ids, rgb_ids, assume_unique=True, return_indices=True)
    order = np.argsort(tac_rows)
    return tac_rows[order].astype(np.int64), rgb_rows[order].astype(np.int64)


class MultiSensorBatchSampler:
    """Batches of row indices drawn without replacement within an epoch.

    Each batch first takes ``round(sigma * batch_size)`` items from one "home" sensor, chosen with
    probability proportional to what it has left among sensors that can still supply that many
    (when none can, the sensor with most left gives all it has); the rest of the batch is drawn
    uniformly from everything left, any sensor.  So at least the sigma fraction of each batch shares
    a sensor and contrastive negatives mix sensors at a controlled rate.  With one sensor (or
    ``sigma=0``) these are plain shuffled batches.

    drop_last: an epoch has ``len(sensor_ids) // batch_size`` full batches; the ``len % batch_size``
    items left over are skipped for that epoch -- a different random subset each epoch.
    The order depends only on ``(seed, epoch)``; call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, sensor_ids: np.ndarray, batch_size: int, sigma: float, seed: int = 0):
        if batch_size < 1 or not 0.0 <= sigma <= 1.0:
            raise ValueError(f"need batch_size >= 1 and 0 <= sigma <= 1, got batch_size={batch_size}, sigma={sigma}")
        self.sensor_ids = np.asarray(sensor_ids)
        self.batch_size, self.sigma, self.seed = batch_size, sigma, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sensor_ids) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools = [list(rng.permutation(np.flatnonzero(self.sensor_ids == s)))
                 for s in np.unique(self.sensor_ids).tolist()]
        n_home = round(self.sigma * self.batch_size) if len(pools) > 1 else 0
        for _ in range(len(self)):
            batch: list[int] = []
            if n_home:
                sizes = np.array([len(p) for p in pools], dtype=float)
                able = np.where(sizes >= n_home, sizes, 0.0)
                home = rng.choice(len(pools), p=able / able.sum()) if able.any() else int(np.argmax(sizes))
                batch += [pools[home].pop() for _ in range(min(n_home, len(pools[home])))]
            while len(batch) < self.batch_size:
                # a sensor picked in proportion to what it has left, then its next item: uniform over all left
                sizes = np.array([len(p) for p in pools], dtype=float)
                batch.append(pools[rng.choice(len(pools), p=sizes / sizes.sum())].pop())
            yield [int(i) for i in batch]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    tau: float = 0.07
    learnable_tau: bool = False
    init_tau: float = 0.07
    sigma: float = 0.5
    patience: int = 10  # epochs without a better validation R@1 before stopping
    seed: int = 0
    ema_decay: float | None = None  # stage 2: evaluate and return an EMA of the weights
    device: str = "cpu"
    amp: bool = True  # float16 autocast + GradScaler; used only on cuda


@dataclass
class TrainResult:
    best_state: dict
    best_epoch: int
    best_val_r1: float
    history: list[dict] = field(default_factory=list)


def _check_inputs(emb_dim: int, batch_size: int, **splits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    for split, (tac, rgb, sensors) in splits.items():
        prefix = "" if split == "train" else f"{split} "
        for name, arr in (("tactile", tac), ("rgb", rgb)):
            if arr.ndim != 2 or arr.shape[1] != emb_dim:
                raise ProjectorDataError(f"{prefix}{name} dim {arr.shape[-1] if arr.ndim else '?'} "
                                         f"!= projector emb_dim {emb_dim} (shape {arr.shape})")
            bad = int((~np.isfinite(arr).all(axis=1)).sum())
            if bad:
                raise ProjectorDataError(f"{prefix}{name} has {bad} rows with NaN/inf")
        if not len(tac) == len(rgb) == len(sensors):
            raise ProjectorDataError(f"{split} split: {len(tac)} tactile rows, {len(rgb)} rgb rows, "
                                     f"{len(sensors)} sensor ids (must be aligned by uid)")
    n_train, n_val = len(splits["train"][0]), len(splits["validation"][0])
    if n_train < batch_size:
        raise ProjectorDataError(f"train split has {n_train} pairs, fewer than batch_size={batch_size}")
    if n_val == 0:
        raise ProjectorDataError("validation split is empty: early stopping needs held-out pairs")


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _ema_update(ema: ViTProjector, model: ViTProjector, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.inference_mode()
def project(model: ViTProjector, vectors: np.ndarray, sensor_ids: np.ndarray | None, batch_size: int = 1024,
            device: str = "cpu") -> np.ndarray:
    """[N, emb_dim] unit float32 rows; leaves the model in eval mode on ``device``."""
    if vectors.ndim != 2 or vectors.shape[1] != model.cfg.emb_dim:
        raise ProjectorDataError(f"vectors of shape {vectors.shape} != projector emb_dim {model.cfg.emb_dim}")
    model.eval().to(device)
    out = []
    for start in range(0, len(vectors), batch_size):
        x = torch.as_tensor(vectors[start:start + batch_size], dtype=torch.float32, device=device)
        s = None if sensor_ids is None else torch.as_tensor(sensor_ids[start:start + batch_size], device=device)
        out.append(model(x, s).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.cfg.emb_dim), np.float32)


def train(model: ViTProjector, train_tac: np.ndarray, train_rgb: np.ndarray, train_sensors: np.ndarray,
          val_tac: np.ndarray, val_rgb: np.ndarray, val_sensors: np.ndarray, cfg: TrainConfig,
          log: Callable[[dict], None] | None = None) -> TrainResult:
    """Align projected tactile to frozen RGB vectors (rows already paired by uid), starting from ``model``'s weights.

    Returns the state (of the EMA model when ``cfg.ema_decay``) with the best validation
    tactile->RGB R@1; training stops after ``cfg.patience`` epochs without improvement.
    """
    _check_inputs(model.cfg.emb_dim, cfg.batch_size, train=(train_tac, train_rgb, train_sensors),
                  validation=(val_tac, val_rgb, val_sensors))
    torch.manual_seed(cfg.seed)  # dropout; the batch order has its own seeded generator
    device = torch.device(cfg.device)
    model.to(device)
    tac = torch.as_tensor(train_tac, dtype=torch.float32, device=device)
    rgb = F.normalize(torch.as_tensor(train_rgb, dtype=torch.float32, device=device), dim=-1)
    sensors = torch.as_tensor(np.asarray(train_sensors), dtype=torch.long, device=device)
    log_tau = torch.tensor(math.log(cfg.init_tau if cfg.learnable_tau else cfg.tau), device=device,
                           requires_grad=cfg.learnable_tau)
    # weight decay on matrices and token tables only (nanoGPT): decaying biases, LayerNorm gains or the
    # temperature only pulls them towards 0 for no regularisation benefit
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2] + ([log_tau] if cfg.learnable_tau else [])
    optimizer = AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sampler = MultiSensorBatchSampler(train_sensors, cfg.batch_size, cfg.sigma, cfg.seed)
    total = cfg.epochs * len(sampler)
    warmup = round(cfg.warmup_epochs * len(sampler))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay else None
    evaluated = ema if ema is not None else model
    best = TrainResult(best_state={}, best_epoch=-1, best_val_r1=-1.0)
    stale = 0
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        sampler.set_epoch(epoch)
        losses = []
        for batch in sampler:
            idx = torch.as_tensor(batch, device=device)
            lr = cfg.lr * _lr_factor(step, total, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = info_nce(model(tac[idx], sensors[idx]), rgb[idx], log_tau.exp())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(decay + no_decay, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if cfg.learnable_tau:
                # clamp the parameter, not its use: a clamped exp() would have zero gradient and stick
                with torch.no_grad():
                    log_tau.clamp_(math.log(TAU_RANGE[0]), math.log(TAU_RANGE[1]))
            if ema is not None:
                _ema_update(ema, model, cfg.ema_decay)
            losses.append(loss.item())
        val_r1 = recall_at_k(project(evaluated, val_tac, val_sensors, device=cfg.device), val_rgb, ks=(1,))["R@1"]
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_r1": val_r1,
               "tau": float(log_tau.detach().exp()), "lr": lr}
        best.history.append(row)
        if log:
            log(row)
        if val_r1 > best.best_val_r1:
            best.best_state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
            best.best_epoch, best.best_val_r1 = epoch + 1, val_r1
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    return best
