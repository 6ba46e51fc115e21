import numpy as np
import pytest
import torch

from tasks.projector_model import ProjectorConfig, ViTProjector, checkpoint_dict, projector_from_checkpoint
from tasks.projector_train import (MultiSensorBatchSampler, TrainConfig, align_by_ids, info_nce, project,
                                   recall_at_k, train)
from tasks.stage import StageError


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def hidden_mapping(n=480, dim=32, seed=0):
    """RGB vectors and tactile vectors that are a fixed nonlinear distortion of them."""
    rng = np.random.default_rng(seed)
    rgb = _unit(rng.normal(size=(n, dim)))
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    tac = _unit(np.tanh(2.0 * rgb @ mix) + 0.05 * rng.normal(size=(n, dim)))
    sensors = rng.integers(0, 2, size=n)
    return tac, rgb, sensors


SMALL = ProjectorConfig(emb_dim=32, dim=64, depth=1, heads=4, num_tokens=4, dropout=0.0, num_sensors=2)


def test_projector_learns_a_hidden_mapping():
    tac, rgb, sensors = hidden_mapping()
    tr, va = slice(0, 400), slice(400, 480)
    raw = recall_at_k(tac[va], rgb[va])["R@1"]
    torch.manual_seed(0)
    model = ViTProjector(SMALL)
    result = train(model, tac[tr], rgb[tr], sensors[tr], tac[va], rgb[va], sensors[va],
                   TrainConfig(epochs=40, batch_size=64, lr=2e-3, warmup_epochs=1, patience=40))
    model.load_state_dict(result.best_state)
    projected = recall_at_k(project(model, tac[va], sensors[va]), rgb[va])["R@1"]
    assert raw < 0.2 and projected > 0.9, (raw, projected)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_sensor_tokens_and_unknown_token():
    torch.manual_seed(0)
    model = ViTProjector(SMALL).eval()
    x = torch.as_tensor(_unit(np.random.default_rng(1).normal(size=(1, 32)))).repeat(4, 1)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 1, -1, 7]))
        none = model(x[:1], None)
    assert not torch.allclose(out[0], out[1])  # sensor tokens change the output
    assert torch.allclose(out[2], out[3]) and torch.allclose(out[2], none[0], atol=1e-5)  # -1, out of range, None: unknown
    assert torch.allclose(out.norm(dim=1), torch.ones(4))
    no_sensor = ViTProjector(ProjectorConfig(emb_dim=32, dim=32, depth=1, heads=2, num_sensors=0)).eval()
    with torch.no_grad():
        assert torch.equal(no_sensor(x, torch.tensor([0, 1, -1, 7]))[0], no_sensor(x, None)[0])


def test_sampler_no_replacement_sigma_and_determinism():
    sensors = np.array([0] * 70 + [1] * 40 + [2] * 20)
    sampler = MultiSensorBatchSampler(sensors, batch_size=20, sigma=0.5, seed=3)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert len(batches) == len(sampler) == 6 and len(flat) == len(set(flat)) == 120  # 10 dropped this epoch
    for b in batches:
        counts = np.bincount(sensors[b], minlength=3)
        assert counts.max() >= 10  # sigma * batch_size items from one sensor
    assert batches == list(sampler)
    sampler.set_epoch(1)
    assert batches != list(sampler)
    single = MultiSensorBatchSampler(np.zeros(50, dtype=int), 10, sigma=0.5)
    assert sorted(i for b in single for i in b) == list(range(50))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ViTProjector(SMALL).eval()
    torch.save(checkpoint_dict(model, stage=1), tmp_path / "p.pt")
    loaded = projector_from_checkpoint(torch.load(tmp_path / "p.pt", weights_only=True))
    x, s = torch.randn(5, 32), torch.tensor([0, 1, -1, 0, 1])
    with torch.no_grad():
        assert torch.equal(model(x, s), loaded(x, s))
    assert loaded.cfg == SMALL


def test_stage2_resumes_from_stage1_with_ema_and_is_deterministic():
    tac, rgb, sensors = hidden_mapping(n=200)
    torch.manual_seed(0)
    stage1 = ViTProjector(SMALL)
    train(stage1, tac[:160], rgb[:160], sensors[:160], tac[160:], rgb[160:], sensors[160:],
          TrainConfig(epochs=3, batch_size=32, patience=5))
    ckpt = checkpoint_dict(stage1)
    runs = []
    for _ in range(2):
        model = projector_from_checkpoint(ckpt)
        for name, value in model.state_dict().items():
            assert torch.equal(value, ckpt["state_dict"][name])  # starts exactly from stage 1
        runs.append(train(model, tac[:160], rgb[:160], sensors[:160], tac[160:], rgb[160:], sensors[160:],
                          TrainConfig(epochs=3, batch_size=32, lr=1e-4, ema_decay=0.9, patience=5)))
    assert runs[0].history == runs[1].history
    changed = any(not torch.equal(v, ckpt["state_dict"][k]) for k, v in runs[0].best_state.items())
    assert changed


def test_errors_say_which():
    tac, rgb, sensors = hidden_mapping(n=40)
    with pytest.raises(StageError, match="train split has 40 pairs, fewer than batch_size=64"):
        train(ViTProjector(SMALL), tac, rgb, sensors, tac, rgb, sensors, TrainConfig(batch_size=64))
    with pytest.raises(StageError, match="tactile dim 16 != projector emb_dim 32"):
        train(ViTProjector(SMALL), tac[:, :16], rgb, sensors, tac, rgb, sensors, TrainConfig(batch_size=8))
    with pytest.raises(StageError, match=r"1 only in tactile \(e.g. \[5\]\), 1 only in RGB \(e.g. \[9\]\)"):
        align_by_ids(np.array([1, 2, 5]), np.array([2, 1, 9]))
    tac_rows, rgb_rows = align_by_ids(np.array([3, 1, 2]), np.array([1, 2, 3]))
    assert rgb_rows.tolist() == [2, 0, 1] and tac_rows.tolist() == [0, 1, 2]


def test_info_nce_prefers_aligned_pairs():
    a = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    assert info_nce(a, a, 0.07) < info_nce(a, a.roll(1, 0), 0.07)
