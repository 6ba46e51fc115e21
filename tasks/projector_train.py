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

from tasks.projector_model import ViTProjector
from tasks.stage import StageError


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` and row i of ``b`` are the positive pair."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def recall_at_k(query: np.ndarray, gallery: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Row i of ``query`` should retrieve row i of ``gallery`` (cosine)."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q @ g.T
    rank = (sims > sims[np.arange(len(q)), np.arange(len(q))][:, None]).sum(axis=1)
    return {f"R@{k}": float(np.mean(rank < k)) for k in ks}


def align_by_ids(tac_ids: np.ndarray, rgb_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices pairing equal uids -- positives are matched by id, never by row position."""
    tac_ids, rgb_ids = np.asarray(tac_ids), np.asarray(rgb_ids)
    for name, ids in (("tactile", tac_ids), ("rgb", rgb_ids)):
        if len(np.unique(ids)) != len(ids):
            raise StageError(f"{name} ids are not unique ({len(ids) - len(np.unique(ids))} duplicates)")
    only_tac = np.setdiff1d(tac_ids, rgb_ids)
    only_rgb = np.setdiff1d(rgb_ids, tac_ids)
    if len(only_tac) or len(only_rgb):
        raise StageError(f"tactile and RGB ids differ: {len(only_tac)} only in tactile (e.g. {only_tac[:5].tolist()}), "
                         f"{len(only_rgb)} only in RGB (e.g. {only_rgb[:5].tolist()})")
    rgb_row = {uid: i for i, uid in enumerate(rgb_ids.tolist())}
    return np.arange(len(tac_ids)), np.array([rgb_row[uid] for uid in tac_ids.tolist()], dtype=np.int64)


class MultiSensorBatchSampler:
    """Batches of row indices drawn without replacement within an epoch.

    Each batch takes ``round(sigma * batch_size)`` items from one sensor (chosen at random among
    sensors with enough left) and the rest from whatever remains of any sensor, so contrastive
    negatives mix sensors at a controlled rate.  Items that cannot fill a last full batch are
    dropped for that epoch (a different subset each epoch, since the order is reshuffled).
    """

    def __init__(self, sensor_ids: np.ndarray, batch_size: int, sigma: float, seed: int = 0):
        self.sensor_ids = np.asarray(sensor_ids)
        self.batch_size, self.sigma, self.seed = batch_size, sigma, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sensor_ids) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools = {s: list(rng.permutation(np.flatnonzero(self.sensor_ids == s)))
                 for s in np.unique(self.sensor_ids).tolist()}
        n_one = round(self.sigma * self.batch_size) if len(pools) > 1 else 0
        for _ in range(len(self)):
            batch: list[int] = []
            eligible = [s for s, pool in pools.items() if len(pool) >= n_one]
            if n_one and eligible:
                sensor = eligible[rng.integers(len(eligible))]
                batch += [pools[sensor].pop() for _ in range(n_one)]
            while len(batch) < self.batch_size:
                sizes = np.array([len(p) for p in pools.values()], dtype=float)
                sensor = list(pools)[rng.choice(len(pools), p=sizes / sizes.sum())]
                batch.append(pools[sensor].pop())
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
    patience: int = 10
    ema_decay: float | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    best_state: dict
    best_epoch: int
    best_val_r1: float
    history: list[dict] = field(default_factory=list)


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def project(model: ViTProjector, vectors: np.ndarray, sensor_ids: np.ndarray | None, batch_size: int = 1024,
            device: str = "cpu") -> np.ndarray:
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
    """Align projected tactile to frozen RGB vectors (rows already paired by uid)."""
    dim = model.cfg.emb_dim
    for name, arr in (("tactile", train_tac), ("rgb", train_rgb), ("validation tactile", val_tac)):
        if arr.shape[1] != dim:
            raise StageError(f"{name} dim {arr.shape[1]} != projector emb_dim {dim}")
    if len(train_tac) < cfg.batch_size:
        raise StageError(f"train split has {len(train_tac)} pairs, fewer than batch_size={cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    tac = torch.as_tensor(train_tac, dtype=torch.float32, device=device)
    rgb = F.normalize(torch.as_tensor(train_rgb, dtype=torch.float32, device=device), dim=-1)
    sensors = torch.as_tensor(train_sensors, device=device)
    log_tau = torch.nn.Parameter(torch.tensor(math.log(cfg.init_tau if cfg.learnable_tau else cfg.tau), device=device),
                                 requires_grad=cfg.learnable_tau)
    params = list(model.parameters()) + ([log_tau] if cfg.learnable_tau else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = MultiSensorBatchSampler(train_sensors, cfg.batch_size, cfg.sigma, cfg.seed)
    total = cfg.epochs * len(sampler)
    warmup = max(1, round(cfg.warmup_epochs * len(sampler)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup, cfg.min_lr_ratio))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = copy.deepcopy(model).eval() if cfg.ema_decay else None
    best = TrainResult(copy.deepcopy(model.state_dict()), -1, -1.0)
    stale = 0
    for epoch in range(cfg.epochs):
        model.train()
        sampler.set_epoch(epoch)
        losses = []
        for batch in sampler:
            idx = torch.as_tensor(batch, device=device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = info_nce(model(tac[idx], sensors[idx]), rgb[idx], log_tau.exp().clamp(0.01, 1.0))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                        if e.is_floating_point():
                            e.mul_(cfg.ema_decay).add_(p.detach(), alpha=1 - cfg.ema_decay)
                        else:
                            e.copy_(p)
        evaluated = ema if ema is not None else model
        val_r1 = recall_at_k(project(evaluated, val_tac, val_sensors, device=cfg.device), val_rgb, ks=(1,))["R@1"]
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_r1": val_r1,
               "tau": float(log_tau.exp().clamp(0.01, 1.0)), "lr": optimizer.param_groups[0]["lr"]}
        best.history.append(row)
        if log:
            log(row)
        if val_r1 > best.best_val_r1:
            best.best_state, best.best_epoch, best.best_val_r1 = copy.deepcopy(evaluated.state_dict()), epoch + 1, val_r1
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    return best
