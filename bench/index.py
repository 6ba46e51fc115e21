"""FAISS index types: build time, latency of 100 queries (min / median of --repeats), recall@10 vs exact flat.

Data (``--data``): ``real`` (default) draws RGB-like vectors with the real SSVTP ImageBind-huge geometry
(``bench.real_geometry``: the real mean direction and principal axes, the real cone of 0.55) and queries the
noise-free vectors of held-out items, as a good projector's outputs would be; ``clustered`` is the older mixture
of 1,000 separated Gaussian clusters with perturbed rows as queries (easier than real embeddings).

The flat baseline is configured as a competent user would: faiss 1.15 ships ``distance_compute_blas_threshold``
= 128,000 queries, below which it scans the database once per query without BLAS (a 100-query batch never
reaches it); it is set to 1 here so exact search runs as a matrix product, which is what flat search costs.

    .venv/bin/python -m bench.index [--n 100000] [--dim 1024] [--nlist 1024] [--nprobe 16] [--ef 64] [--data real]
Writes bench/results/index_<n>.json and prints a table with the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import faiss
import numpy as np

from touchvl import disk
from touchvl.retrieval.index import build_index, normalize


def synthetic(n: int, dim: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((clusters, dim), dtype=np.float32))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):  # chunks keep peak memory at one copy of the data
        stop = min(n, start + 50_000)
        labels = rng.integers(clusters, size=stop - start)
        out[start:stop] = centres[labels] + 0.6 / np.sqrt(dim) * rng.standard_normal((stop - start, dim), dtype=np.float32)
    return normalize(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef", type=int, default=64)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--types", default="flat,ivf,hnsw", help="comma-separated; flat is always run (the reference)")
    ap.add_argument("--data", choices=("real", "clustered"), default="real")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    faiss.cvar.distance_compute_blas_threshold = 1  # exact search through BLAS (see the docstring)
    print(f"load average {os.getloadavg()[0]:.2f}; data {args.data}")
    if args.data == "real":
        from bench.real_geometry import REAL, synthesize

        real_tac = np.load(REAL / "test_tac_imagebind_huge.npy")
        real_rgb = np.load(REAL / "test_rgb_imagebind_huge.npy")
        if args.dim != real_rgb.shape[1]:
            ap.error(f"--data real has the real dimension {real_rgb.shape[1]}")
        _, noisy, clean = synthesize(args.n + args.queries, 16, 0.3, 0, real_tac, real_rgb)
        db, queries = np.ascontiguousarray(noisy[:args.n]), np.ascontiguousarray(clean[args.n:])
        # the queries' own items are in the database, as a tactile query's photo is
        db[:args.queries] = noisy[args.n:]
    else:
        db = synthetic(args.n, args.dim)
        rng = np.random.default_rng(1)
        queries = normalize(db[rng.choice(args.n, args.queries, replace=False)]
                            + 0.3 / np.sqrt(args.dim) * rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    ids = np.arange(args.n, dtype=np.int64)
    settings = {"flat": {}, "ivf": dict(nlist=args.nlist, nprobe=args.nprobe, train_size=min(args.n, 100_000)),
                "hnsw": dict(hnsw_m=args.hnsw_m, ef_construction=200, ef_search=args.ef)}
    wanted = {"flat", *args.types.split(",")}
    settings = {name: kwargs for name, kwargs in settings.items() if name in wanted}
    results, truth = {}, None
    for name, kwargs in settings.items():
        start = time.perf_counter()
        index = build_index(db, ids, name, **kwargs)
        build_s = time.perf_counter() - start
        index.search(queries[:5], 10)  # warm-up
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _, found = index.search(queries, 10)
            timings.append(time.perf_counter() - start)
        query_s = min(timings)
        truth = found if truth is None else truth
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())]))
        results[name] = {"params": kwargs, "build_s": round(build_s, 2), "query_100_s": round(query_s, 4),
                         "query_100_s_median": round(statistics.median(timings), 4),
                         "recall@10_vs_flat": round(recall, 4)}
        del index
    for name in set(results) - {"flat"}:
        results[name]["speedup_vs_flat"] = round(results["flat"]["query_100_s"] / results[name]["query_100_s"], 1)
    report = {"n": args.n, "dim": args.dim, "data": args.data, "threads": faiss.omp_get_max_threads(),
              "load_average": os.getloadavg()[0], "results": results}
    disk.write_json(Path(__file__).parent / "results" / f"index_{args.n}.json", report)
    print(f"n={args.n} dim={args.dim} threads={report['threads']}")
    for name, r in results.items():
        print(f"{name:5s} build {r['build_s']:8.2f}s  100 queries min {r['query_100_s']:.4f}s "
              f"median {r['query_100_s_median']:.4f}s  "
              f"recall@10 {r['recall@10_vs_flat']:.3f}  speedup {r.get('speedup_vs_flat', 1.0)}x")


if __name__ == "__main__":
    main()
