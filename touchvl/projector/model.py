"""ViT-style vector -> vector projector (UniTouch-style): tactile embedding into RGB space.

vector -> ``num_tokens`` tokens (retokenize) + CLS + optional sensor tokens -> Transformer encoder
-> CLS -> linear back to the embedding dimension -> residual from the input -> L2 normalise.
No I/O here: checkpoints are plain dicts (``{'state_dict', 'config'}``) that the stage saves and
loads, so ``torch.load(weights_only=True)`` can read them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

INIT_RESIDUAL_NORM = 0.1
"""Norm of the transformer branch at initialisation, relative to the unit-norm input."""


@dataclass(frozen=True)
class ProjectorConfig:
    emb_dim: int
    dim: int = 256
    depth: int = 4
    heads: int = 4
    num_tokens: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    num_sensors: int = 0  # K sensors with learnable tokens; 0 disables sensor tokens
    sensor_tokens: int = 2  # L tokens per sensor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectorConfig":
        return cls(**d)


class ViTProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.retokenize = nn.Linear(cfg.emb_dim, cfg.num_tokens * cfg.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        n_sensor = cfg.sensor_tokens if cfg.num_sensors > 0 else 0
        if n_sensor:
            self.sensor = nn.Parameter(torch.randn(cfg.num_sensors, n_sensor, cfg.dim) * 0.02)
            self.unknown_sensor = nn.Parameter(torch.randn(n_sensor, cfg.dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + n_sensor + cfg.num_tokens, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, int(cfg.dim * cfg.mlp_ratio), cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # nested tensors are a fast path for padded batches only, and warn with norm_first
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.emb_dim)
        # The output is normalize(x + head(cls)).  The head starts small (branch norm ~0.1 against the
        # unit input, whatever emb_dim is: the LayerNormed CLS has norm ~sqrt(dim)), so a fresh
        # projector is close to the identity: training starts from the raw tactile geometry instead of
        # a random map of it, and the branch grows only as far as the contrastive loss asks.
        nn.init.normal_(self.head.weight, std=INIT_RESIDUAL_NORM / math.sqrt(cfg.dim * cfg.emb_dim))
        nn.init.zeros_(self.head.bias)

    def sensor_embeddings(self, sensor_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[B, L, dim]: each row's sensor tokens; id -1, out of range or no ids -> the unknown token."""
        unknown = self.unknown_sensor.expand(batch, -1, -1)
        if sensor_ids is None:
            return unknown
        if sensor_ids.shape != (batch,):
            raise ValueError(f"sensor_ids has shape {tuple(sensor_ids.shape)}, expected ({batch},)")
        sensor_ids = sensor_ids.to(self.sensor.device)
        known = (sensor_ids >= 0) & (sensor_ids < self.cfg.num_sensors)
        picked = self.sensor[sensor_ids.clamp(0, self.cfg.num_sensors - 1)]
        return torch.where(known[:, None, None], picked, unknown)

    def forward(self, x: torch.Tensor, sensor_ids: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        # unit input: retrieval is by cosine, and the residual path then has the scale the head init assumes
        x = F.normalize(x, dim=-1)
        tokens = self.retokenize(x).view(b, self.cfg.num_tokens, self.cfg.dim)
        parts = [self.cls.expand(b, -1, -1)]
        if self.cfg.num_sensors > 0:
            parts.append(self.sensor_embeddings(sensor_ids, b))
        h = torch.cat(parts + [tokens], dim=1) + self.pos
        cls = self.norm(self.encoder(h)[:, 0])
        return F.normalize(x + self.head(cls), dim=-1)


def checkpoint_dict(model: ViTProjector, **extra) -> dict:
    """Plain tensors and dicts only, so ``torch.load(weights_only=True)`` reads it back."""
    return {"state_dict": model.state_dict(), "config": model.cfg.to_dict(), **extra}


def projector_from_checkpoint(ckpt: dict) -> ViTProjector:
    """Rebuild from the checkpoint's own config (never from current params), in eval mode."""
    model = ViTProjector(ProjectorConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
