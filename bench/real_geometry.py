"""Where the ViT projector stands on embeddings with the real SSVTP geometry (measured, not asserted).

``../shared/real-ssvtp/`` holds ImageBind-huge vectors of 46 real tactile/RGB pairs: too few to train on, but they
fix the geometry a projector faces: tactile vectors in a narrow cone (mean pairwise cosine 0.93), RGB wider
(0.55), raw tactile->RGB R@1 at chance. This draws any number of synthetic pairs with that geometry:

* a hidden latent ``z`` (``--latent`` dims) per item;
* RGB = normalise(real RGB mean + s_r * (U_r z + noise)), U_r spanning the real RGB vectors' top principal axes;
* tactile = normalise(real tactile mean + s_t * (U_t tanh(W z) + noise)), U_t the real tactile axes and W a random
  mixing: a learnable but nonlinear relation, in directions unrelated to the RGB ones (raw alignment at chance);
* s_r, s_t solved so the cones match the real ones.

Then trains, on the same train/val split, the stage's own projector code (``touchvl.projector.pairs.fit`` with
``params.yaml``'s projector and ``train_stage1`` sections), a ridge regression and an orthogonal Procrustes map,
and scores test R@1 against a gallery of 46 (as the real file) and of ``--gallery`` items, beside an oracle that
knows ``z`` (the noise-free RGB vector: the ceiling the noise leaves).

    .venv/bin/python -m bench.real_geometry [--train 3000] [--gallery 1000] [--noise 0.3]
Writes bench/results/real_geometry.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

# $TOUCHVL_REAL_SSVTP: the folder, for a checkout (a git worktree) whose parent holds no shared/
REAL = Path(os.environ.get("TOUCHVL_REAL_SSVTP") or Path(__file__).resolve().parents[2] / "shared" / "real-ssvtp")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mean_pairwise_cosine(x: np.ndarray) -> float:
    x = unit(x)
    n = len(x)
    s = x @ x.T
    return float((s.sum() - np.trace(s)) / (n * n - n))


def recall_at_1(query: np.ndarray, gallery: np.ndarray) -> float:
    sims = unit(query) @ unit(gallery).T
    return float(np.mean(np.argmax(sims, axis=1) == np.arange(len(query))))


def principal_axes(x: np.ndarray, k: int) -> np.ndarray:
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:k].T  # [D, k]


def _solve_scale(mean: np.ndarray, spread: np.ndarray, target_cone: float) -> float:
    """The scale s for which normalise(mean + s * spread) has the target mean pairwise cosine (bisection)."""
    lo, hi = 1e-4, 100.0
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        cone = mean_pairwise_cosine(mean + mid * spread[:400])
        lo, hi = (mid, hi) if cone > target_cone else (lo, mid)
    return (lo * hi) ** 0.5


def synthesize(n: int, latent: int, noise: float, seed: int, real_tac: np.ndarray, real_rgb: np.ndarray):
    rng = np.random.default_rng(seed)
    dim = real_tac.shape[1]
    k = min(latent, len(real_tac) - 1)
    u_rgb, u_tac = principal_axes(real_rgb, k), principal_axes(real_tac, k)
    mixing = rng.normal(size=(k, k)) * (1.5 / np.sqrt(k))
    z = rng.normal(size=(n, k))
    rgb_clean = z @ u_rgb.T
    tac_clean = np.tanh(z @ mixing) @ u_tac.T
    rgb_spread = rgb_clean + noise * rng.normal(size=(n, dim)) * np.sqrt(k / dim)
    tac_spread = tac_clean + noise * rng.normal(size=(n, dim)) * np.sqrt(k / dim)
    m_rgb, m_tac = unit(real_rgb).mean(0), unit(real_tac).mean(0)
    s_rgb = _solve_scale(m_rgb, rgb_spread, mean_pairwise_cosine(real_rgb))
    s_tac = _solve_scale(m_tac, tac_spread, mean_pairwise_cosine(real_tac))
    return (unit(m_tac + s_tac * tac_spread).astype(np.float32), unit(m_rgb + s_rgb * rgb_spread).astype(np.float32),
            unit(m_rgb + s_rgb * rgb_clean).astype(np.float32))


def synthesize_rgb(n: int, latent: int, noise: float, seed: int, real_tac: np.ndarray, real_rgb: np.ndarray,
                   chunk: int = 32_768):
    """The RGB side of :func:`synthesize` (the same random stream, so the same rows), in float32 chunks of
    ``chunk`` rows: yields ``(start, noisy, clean)``. Memory is the chunks', not ``n x dim`` float64 arrays
    (8 GB each at a million 1,024-d rows). The tactile side is not drawn (its noise comes after the RGB noise)."""
    rng = np.random.default_rng(seed)
    dim = real_rgb.shape[1]
    k = min(latent, len(real_tac) - 1)
    u_rgb = principal_axes(real_rgb, k)
    rng.normal(size=(k, k))  # synthesize's mixing matrix: drawn to keep the stream aligned
    z = rng.normal(size=(n, k))
    m_rgb = unit(real_rgb).mean(0)
    chunk = max(chunk, 400)  # the first chunk holds the 400 rows the cone's scale is solved on
    s_rgb = None
    for start in range(0, n, chunk):
        clean = z[start:start + chunk] @ u_rgb.T
        spread = clean + noise * rng.normal(size=(len(clean), dim)) * np.sqrt(k / dim)
        if s_rgb is None:
            s_rgb = _solve_scale(m_rgb, spread, mean_pairwise_cosine(real_rgb))
        yield start, unit(m_rgb + s_rgb * spread).astype(np.float32), unit(m_rgb + s_rgb * clean).astype(np.float32)


def ridge(x: np.ndarray, y: np.ndarray, lam: float):
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - my))
    return lambda q: (q - mx) @ w + my


def procrustes(x: np.ndarray, y: np.ndarray):
    mx, my = x.mean(0), y.mean(0)
    u, _, vt = np.linalg.svd((x - mx).T @ (y - my), full_matrices=False)
    return lambda q: (q - mx) @ (u @ vt) + my


def vit_projector(tac, rgb, split, params):
    import torch

    from touchvl.projector.model import ProjectorConfig, ViTProjector
    from touchvl.projector.pairs import PairedEmbeddings, fit
    from touchvl.projector.training import project

    p = params.projector
    torch.manual_seed(params.train_stage1.seed)
    n = len(tac)
    data = PairedEmbeddings(uids=np.arange(n), tac=tac, rgb=rgb, text=None, sensors=np.zeros(n, np.int64),
                            split=split, original=np.ones(n, bool), captions=np.array([""] * n),
                            encoder_fingerprint="synthetic")
    model = ViTProjector(ProjectorConfig(emb_dim=tac.shape[1], dim=p.dim, depth=p.depth, heads=p.heads,
                                         num_tokens=p.num_tokens, mlp_ratio=p.mlp_ratio, dropout=p.dropout,
                                         num_sensors=1, sensor_tokens=p.sensor_tokens))
    result = fit(model, data, params.train_stage1, "cpu")
    model.load_state_dict(result.best_state)
    return lambda q: project(model, q, np.zeros(len(q), np.int64)), result.best_epoch


def main() -> None:
    from touchvl.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--gallery", type=int, default=1000)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/real_geometry.json"))
    args = parser.parse_args()
    real_tac = np.load(REAL / "test_tac_imagebind_huge.npy")
    real_rgb = np.load(REAL / "test_rgb_imagebind_huge.npy")
    n_val = max(46, args.train // 10)
    n = args.train + n_val + args.gallery
    tac, rgb, rgb_oracle = synthesize(n, args.latent, args.noise, args.seed, real_tac, real_rgb)
    split = np.array(["train"] * args.train + ["val"] * n_val + ["test"] * args.gallery)
    tr, te = split == "train", split == "test"
    print(f"load average {os.getloadavg()[0]:.2f}; real cones tac {mean_pairwise_cosine(real_tac):.3f} "
          f"rgb {mean_pairwise_cosine(real_rgb):.3f}, raw R@1 {recall_at_1(real_tac, real_rgb):.3f} (46)")
    print(f"synthetic cones tac {mean_pairwise_cosine(tac[te]):.3f} rgb {mean_pairwise_cosine(rgb[te]):.3f}")
    params = load_params()
    started = time.perf_counter()
    vit, best_epoch = vit_projector(tac, rgb, split, params)
    vit_s = time.perf_counter() - started
    methods = {"raw": lambda q: q, "ridge": ridge(tac[tr], rgb[tr], 1.0), "procrustes": procrustes(tac[tr], rgb[tr]),
               "vit_projector": vit}
    rows = {}
    for name, fn in methods.items():
        projected = fn(tac[te])
        rows[name] = {"R@1_46": recall_at_1(projected[:46], rgb[te][:46]),
                      f"R@1_{args.gallery}": recall_at_1(projected, rgb[te])}
    rows["oracle"] = {"R@1_46": recall_at_1(rgb_oracle[te][:46], rgb[te][:46]),
                      f"R@1_{args.gallery}": recall_at_1(rgb_oracle[te], rgb[te])}
    print(f"{'method':<14} {'R@1 (46)':>9} {f'R@1 ({args.gallery})':>11}")
    for name, row in rows.items():
        print(f"{name:<14} {row['R@1_46']:>9.3f} {row[f'R@1_{args.gallery}']:>11.3f}")
    print(f"vit_projector trained in {vit_s:.0f} s (best epoch {best_epoch}); "
          f"ratio vit/ridge at {args.gallery}: "
          f"{rows['vit_projector'][f'R@1_{args.gallery}'] / max(rows['ridge'][f'R@1_{args.gallery}'], 1e-9):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
                                    "synthetic_cones": {"tac": mean_pairwise_cosine(tac[te]),
                                                        "rgb": mean_pairwise_cosine(rgb[te])},
                                    "vit_seconds": round(vit_s, 1), "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
