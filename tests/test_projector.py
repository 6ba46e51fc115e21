import numpy as np
import pytest
import torch

from touchvl.projector.model import ProjectorConfig, ViTProjector, checkpoint_dict, projector_from_checkpoint
from touchvl.projector.training import (MultiSensorBatchSampler, TrainConfig, align_by_ids, info_nce, project,
                                   recall_at_k, train)
from touchvl.errors import StageError


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def hidden_mapping(n=400, dim=32, seed=0):
    """RGB vectors and tactile vectors that are a fixed nonlinear distortion of a random rotation of them."""
    rng = np.random.default_rng(seed)
    rgb = _unit(rng.normal(size=(n, dim)))
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    tac = _unit(np.tanh(2.0 * rgb @ rotation) + 0.05 * rng.normal(size=(n, dim)))
    sensors = rng.integers(0, 2, size=n)
    return tac, rgb, sensors


SMALL = ProjectorConfig(emb_dim=32, dim=64, depth=1, heads=4, num_tokens=4, dropout=0.0, num_sensors=2)


def test_projector_learns_a_hidden_mapping():
    tac, rgb, sensors = hidden_mapping()
    tr, va = slice(0, 320), slice(320, 400)
    raw = recall_at_k(tac[va], rgb[va])["R@1"]
    torch.manual_seed(0)
    model = ViTProjector(SMALL)
    result = train(model, tac[tr], rgb[tr], sensors[tr], tac[va], rgb[va], sensors[va],
                   TrainConfig(epochs=20, batch_size=64, lr=2e-3, warmup_epochs=1, patience=20))
    model.load_state_dict(result.best_state)
    projected = recall_at_k(project(model, tac[va], sensors[va]), rgb[va])["R@1"]
    assert raw < 0.1 and projected > 0.9, (raw, projected)  # chance is 1/80
    assert result.best_val_r1 == max(row["val_r1"] for row in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert list(result.history[0]) == ["epoch", "loss", "val_r1", "tau", "lr"]


def test_fresh_projector_is_near_identity_and_recall_punishes_collapse():
    tac, _, sensors = hidden_mapping(n=50, dim=512)
    model = ViTProjector(ProjectorConfig(emb_dim=512, dim=32, depth=1, heads=2, num_sensors=2))
    out = project(model, tac, sensors)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert (np.sum(out * tac, axis=1) > 0.99).all()  # the raw geometry survives initialisation
    assert recall_at_k(torch.ones(5, 3), torch.ones(5, 3)) == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0}


def test_sensor_tokens_and_unknown_token():
    torch.manual_seed(0)
    model = ViTProjector(SMALL).eval()
    x = torch.as_tensor(_unit(np.random.default_rng(1).normal(size=(1, 32)))).repeat(4, 1)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 1, -1, 7]))
        none = model(x[:1], None)
    assert not torch.allclose(out[0], out[1])  # sensor tokens change the output
    assert torch.equal(out[2], out[3]) and torch.allclose(out[2], none[0], atol=1e-6)  # -1, out of range, None
    assert not torch.allclose(out[0], out[2])
    no_sensor = ViTProjector(ProjectorConfig(emb_dim=32, dim=32, depth=1, heads=2, num_sensors=0)).eval()
    with torch.no_grad():
        assert torch.equal(no_sensor(x, torch.tensor([0, 1, -1, 7]))[0], no_sensor(x, None)[0])


@pytest.mark.parametrize("sigma", [0.5, 0.75])
def test_sampler_no_replacement_sigma_and_determinism(sigma):
    sensors = np.array([0] * 70 + [1] * 40 + [2] * 25)  # 135 rows: 6 batches of 20, 15 dropped
    sampler = MultiSensorBatchSampler(sensors, batch_size=20, sigma=sigma, seed=3)
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert len(batches) == len(sampler) == 6 and all(len(b) == 20 for b in batches)
        assert len(flat) == len(set(flat)) == 120 and set(flat) <= set(range(135))  # only the tail is dropped
        for b in batches:
            assert np.bincount(sensors[b], minlength=3).max() >= round(sigma * 20)
        fresh = MultiSensorBatchSampler(sensors, 20, sigma, seed=3)
        fresh.set_epoch(epoch)
        assert batches == list(sampler) == list(fresh)  # same (seed, epoch): same batches
        seen.append(batches)
    assert seen[0] != seen[1] != seen[2]
    assert list(MultiSensorBatchSampler(sensors, 20, sigma, seed=4)) != seen[0]


def test_sampler_single_sensor_is_plain_shuffle():
    single = MultiSensorBatchSampler(np.zeros(50, dtype=int), 10, sigma=0.5)
    flat = [i for b in single for i in b]
    assert sorted(flat) == list(range(50)) and flat != list(range(50))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ViTProjector(SMALL).eval()
    torch.save(checkpoint_dict(model, stage=1), tmp_path / "p.pt")
    ckpt = torch.load(tmp_path / "p.pt", weights_only=True)
    loaded = projector_from_checkpoint(ckpt)
    x, s = torch.randn(5, 32), torch.tensor([0, 1, -1, 0, 1])
    with torch.no_grad():
        assert torch.equal(model(x, s), loaded(x, s))
    assert loaded.cfg == SMALL and ckpt["stage"] == 1


def test_stage2_resumes_from_stage1_with_ema_and_is_deterministic():
    tac, rgb, sensors = hidden_mapping(n=200)
    data = (tac[:160], rgb[:160], sensors[:160], tac[160:], rgb[160:], sensors[160:])
    torch.manual_seed(0)
    stage1 = ViTProjector(SMALL)
    train(stage1, *data, TrainConfig(epochs=3, batch_size=32, lr=2e-3, patience=5))
    ckpt = checkpoint_dict(stage1)
    runs = []
    for _ in range(2):
        model = projector_from_checkpoint(ckpt)
        for name, value in model.state_dict().items():
            assert torch.equal(value, ckpt["state_dict"][name])  # starts exactly from stage 1
        runs.append(train(model, *data, TrainConfig(epochs=2, batch_size=32, lr=1e-4, warmup_epochs=0,
                                                    ema_decay=0.9, patience=5)))
    assert runs[0].history == runs[1].history
    assert all(torch.equal(v, runs[1].best_state[k]) for k, v in runs[0].best_state.items())
    # the EMA weights moved, but only a low-LR step away from stage 1 (a fresh init is far away)
    drift = max((v - ckpt["state_dict"][k]).abs().max().item() for k, v in runs[0].best_state.items())
    fresh = ViTProjector(SMALL).state_dict()
    init_gap = max((v - ckpt["state_dict"][k]).abs().max().item() for k, v in fresh.items())
    assert 0 < drift < 5e-3 < init_gap


def test_learnable_tau_moves_and_stays_in_range():
    tac, rgb, sensors = hidden_mapping(n=96)
    result = train(ViTProjector(SMALL), tac[:64], rgb[:64], sensors[:64], tac[64:], rgb[64:], sensors[64:],
                   TrainConfig(epochs=2, batch_size=32, lr=5e-2, learnable_tau=True, init_tau=0.5, patience=5))
    taus = [row["tau"] for row in result.history]
    assert taus[0] != 0.5 and all(0.01 <= t <= 1.0 for t in taus)


def test_errors_say_which():
    tac, rgb, sensors = hidden_mapping(n=40)
    with pytest.raises(ValueError, match="train split has 40 pairs, fewer than batch_size=64") as err:
        train(ViTProjector(SMALL), tac, rgb, sensors, tac, rgb, sensors, TrainConfig(batch_size=64))
    assert isinstance(err.value, StageError)  # the stage prints it without a traceback
    with pytest.raises(ValueError, match="tactile dim 16 != projector emb_dim 32"):
        train(ViTProjector(SMALL), tac[:, :16], rgb, sensors, tac, rgb, sensors, TrainConfig(batch_size=8))
    with pytest.raises(ValueError, match="validation rgb dim 16 != projector emb_dim 32"):
        train(ViTProjector(SMALL), tac, rgb, sensors, tac, rgb[:, :16], sensors, TrainConfig(batch_size=8))
    with pytest.raises(ValueError, match=r"1 only in tactile \(e.g. \[5\]\), 1 only in RGB \(e.g. \[9\]\)"):
        align_by_ids(np.array([1, 2, 5]), np.array([2, 1, 9]))
    with pytest.raises(ValueError, match=r"rgb ids are not unique: 1 repeated \(e.g. \[2\]\)"):
        align_by_ids(np.array([1, 2]), np.array([2, 2, 1]))


def test_align_by_ids_pairs_by_uid_not_position():
    tac_rows, rgb_rows = align_by_ids(np.array([3, 1, 2]), np.array([1, 2, 3]))
    assert tac_rows.tolist() == [0, 1, 2] and rgb_rows.tolist() == [2, 0, 1]
    tac_rows, rgb_rows = align_by_ids(np.array([7, 1, 5, 2]), np.array([2, 9, 1, 7]), strict=False)
    assert tac_rows.tolist() == [0, 1, 3] and rgb_rows.tolist() == [3, 2, 0]


def test_info_nce_prefers_aligned_pairs():
    a = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    assert info_nce(a, a, 0.07) < info_nce(a, a.roll(1, 0), 0.07)
