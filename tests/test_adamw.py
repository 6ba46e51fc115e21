"""touchvl.adamw: the same updates as torch.optim.AdamW, without importing torch._dynamo."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from touchvl.adamw import AdamW


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def _run(optimizer_cls, scaler_enabled: bool, steps: int = 25) -> list[torch.Tensor]:
    model = _model(0)
    optimizer = optimizer_cls(_groups(model, 0.1), lr=3e-3, betas=(0.8, 0.95), eps=1e-6)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled, init_scale=2.0 ** 8, growth_interval=3)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in optimizer.param_groups:  # a schedule: what the projector and pretrain loops do
            group["lr"] = 3e-3 * (1 - step / steps)
        x = torch.randn(16, 6, generator=data)
        loss = model(x).pow(2).mean()
        if scaler_enabled and step == 7:
            loss = loss * float("inf")  # an overflowing step: the scaler must skip it for both optimizers
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
        scaler.step(optimizer)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("scaler_enabled", [False, True], ids=["plain", "grad-scaler"])
def test_adamw_matches_torch_bit_for_bit(scaler_enabled):
    ours, theirs = _run(AdamW, scaler_enabled), _run(torch.optim.AdamW, scaler_enabled)
    start = [p.detach() for p in _model(0).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ours, start)), "the optimizer never moved a parameter"
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_adamw_skips_parameters_without_gradients_and_rejects_shared_parameters():
    frozen, trained = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = AdamW([{"params": [frozen, trained]}], lr=0.1)
    trained.sum().backward()
    optimizer.step()
    assert torch.equal(frozen, torch.ones(3)) and not torch.equal(trained, torch.ones(3))
    assert frozen not in optimizer.state
    optimizer.zero_grad(set_to_none=False)
    assert trained.grad is not None and torch.count_nonzero(trained.grad) == 0
    with pytest.raises(ValueError, match="more than one"):
        AdamW([{"params": [trained]}, {"params": [trained]}], lr=0.1)


def test_training_loops_do_not_import_torch_dynamo():
    """The fixed cost this optimizer exists to remove: train() of the projector and the smoke pretraining."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import torch
        from touchvl.imagebind.encoder import EncoderSpec, build_model, tokenize
        from touchvl.imagebind.pretrain import PretrainConfig, PretrainData, pretrain
        from touchvl.projector.model import ProjectorConfig, ViTProjector
        from touchvl.projector.training import TrainConfig, train
        rng = np.random.default_rng(0)
        cfg = ProjectorConfig(emb_dim=16, dim=16, depth=1, heads=2, num_tokens=2)
        vec = lambda n: rng.normal(size=(n, 16)).astype(np.float32)
        result = train(ViTProjector(cfg), vec(16), vec(16), np.zeros(16, int), vec(8), vec(8), np.zeros(8, int),
                       TrainConfig(epochs=2, batch_size=8, ema_decay=0.9, learnable_tau=True))
        assert len(result.history) == 2, result.history
        captions = ["smooth hard", "rough soft"] * 4
        data = PretrainData(torch.randn(8, 3, 224, 224), np.repeat(np.arange(4), 2), captions, tokenize(captions))
        curve = pretrain(build_model(EncoderSpec()), data, PretrainConfig(epochs=1, batch_size=2), progress=False)
        assert len(curve.history) == 1, curve.history
        print("dynamo imported:", "torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "dynamo imported: False" in out.stdout
