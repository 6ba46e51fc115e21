"""FAISS index types: build time, latency of 100 queries (min / median of --repeats), recall@10 vs exact flat.

Data (``--data``): ``real`` (default) draws RGB-like vectors with the real SSVTP ImageBind-huge geometry
(``bench.real_geometry``: the real mean direction and principal axes, the real cone of 0.55) and queries the
noise-free vectors of held-out items, as a good projector's outputs would be; ``clustered`` is the older mixture
of 1,000 separated Gaussian clusters with perturbed rows as queries (easier than real embeddings). The vectors are
generated in float32 chunks (the same rows as ``real_geometry.synthesize``), so 1,000,000 x 1,024 holds one 4 GB
database plus the index being measured (``--n 1000000`` peaks near 8.5 GB).

The flat baseline is configured as a competent user would: faiss 1.15 ships ``distance_compute_blas_threshold``
= 128,000 queries, below which it scans the database once per query without BLAS (a 100-query batch never
reaches it); it is set to 1 here so exact search runs as a matrix product, which is what flat search costs. Its
database block (``distance_compute_blas_database_bs``, 1,024 rows as shipped) is raised to 16,384: with the
shipped block a 100-query search is 100 small matrix products and measured 4x slower than one ``numpy`` product
on this 2-core machine under load (1.9 s vs 0.45 s at 100k); at 16,384 it is as fast as numpy (the block buffer
is 4,096 x 16,384 floats, 256 MB). ``flat_numpy`` (one ``queries @ db.T`` and ``argpartition``) is timed beside
it as a second exact reference; speedups are against faiss's flat (``speedup_vs_best_exact``: the faster of
the two).

Types (``--types``, flat always runs first: it is the reference):

* ``ivf``: IVF-Flat (``IVF<nlist>,Flat``), exact distances inside the probed lists;
* ``ivf_sq8``: ``IVF<nlist>,SQ8`` (one byte a dimension, no re-ranking);
* ``ivf_pq``: ``IVF<nlist>,PQ<m>x4fsr,RFlat`` -- 4-bit fast-scan product quantization of the residuals, the
  ``k_factor * k`` best re-ranked exactly with the full vectors (``IndexRefineFlat``), for each ``--pq-m``;
* ``hnsw``: ``HNSW<m>,Flat``.

Each IVF index is built once and searched at every ``--nprobe`` (and, for ``ivf_pq``, every ``--k-factor``).

    .venv/bin/python -m bench.index [--n 100000] [--nlist 1024] [--nprobe 16,64] [--types flat,ivf,ivf_pq]
        [--pq-m 64,128] [--k-factor 8,16] [--train-size N] [--data real] [--out PATH]
Writes bench/results/index_<n>.json (or --out) and prints a table with the load average and the threads.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import time
from pathlib import Path

import faiss
import numpy as np

from touchvl import disk
from touchvl.retrieval.index import build_index, normalize, set_search_params


def synthetic(n: int, dim: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((clusters, dim), dtype=np.float32))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):  # chunks keep peak memory at one copy of the data
        stop = min(n, start + 50_000)
        labels = rng.integers(clusters, size=stop - start)
        out[start:stop] = centres[labels] + 0.6 / np.sqrt(dim) * rng.standard_normal((stop - start, dim), dtype=np.float32)
    for start in range(0, n, 50_000):
        out[start:start + 50_000] = normalize(out[start:start + 50_000])
    return out


def real_data(n: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy database rows and ``queries`` clean query rows of held-out items whose noisy rows replace the
    database's first ``queries`` (the queries' own items are in the database, as a tactile query's photo is)."""
    from bench.real_geometry import REAL, synthesize_rgb

    real_tac = np.load(REAL / "test_tac_imagebind_huge.npy")
    real_rgb = np.load(REAL / "test_rgb_imagebind_huge.npy")
    db = np.empty((n, real_rgb.shape[1]), dtype=np.float32)
    qs = np.empty((queries, real_rgb.shape[1]), dtype=np.float32)
    for start, noisy, clean in synthesize_rgb(n + queries, 16, 0.3, 0, real_tac, real_rgb):
        stop = start + len(noisy)
        if start < n:
            db[start:min(stop, n)] = noisy[:n - start]
        if stop > n:
            first = max(start, n)
            db[first - n:stop - n] = noisy[first - start:]
            qs[first - n:stop - n] = clean[first - start:]
    return db, qs


def timed_search(index: faiss.Index, queries: np.ndarray, repeats: int) -> tuple[list[float], np.ndarray]:
    index.search(queries[:5], 10)  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, found = index.search(queries, 10)
        timings.append(time.perf_counter() - start)
    return timings, found


def numpy_exact(db: np.ndarray, queries: np.ndarray, repeats: int) -> tuple[list[float], np.ndarray]:
    def search() -> np.ndarray:
        scores = queries @ db.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)

    search()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        found = search()
        timings.append(time.perf_counter() - start)
    return timings, found


def release_memory() -> None:
    """Give freed index memory back to the OS (glibc keeps freed inverted-list chunks in its heap otherwise, and
    the next index is built on top of them)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident memory in GB."""
    with open("/proc/self/statm") as fh:
        current = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return current / 1e9, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", default="16", help="comma-separated; each IVF index is searched at each")
    ap.add_argument("--pq-m", default="128", help="ivf_pq: comma-separated sub-quantizer counts (4 bits each)")
    ap.add_argument("--k-factor", default="32,64", help="ivf_pq: comma-separated re-ranking factors")
    ap.add_argument("--train-size", type=int, default=None, help="k-means sample (default min(n, 100,000))")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef", type=int, default=64)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--types", default="flat,ivf,hnsw", help="comma-separated; flat is always run (the reference)")
    ap.add_argument("--data", choices=("real", "clustered"), default="real")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/index_<n>.json")
    args = ap.parse_args()
    faiss.cvar.distance_compute_blas_threshold = 1  # exact search through BLAS (see the docstring)
    faiss.cvar.distance_compute_blas_database_bs = 16_384
    load_start = os.getloadavg()
    print(f"load average {load_start[0]:.2f} (1 min) {load_start[1]:.2f} (5 min); data {args.data}; "
          f"threads {faiss.omp_get_max_threads()}", flush=True)
    if args.data == "real":
        started = time.perf_counter()
        db, queries = real_data(args.n, args.queries)
        if args.dim != db.shape[1]:
            ap.error(f"--data real has the real dimension {db.shape[1]}")
        print(f"data generated in {time.perf_counter() - started:.0f} s", flush=True)
    else:
        db = synthetic(args.n, args.dim)
        rng = np.random.default_rng(1)
        queries = normalize(db[rng.choice(args.n, args.queries, replace=False)]
                            + 0.3 / np.sqrt(args.dim) * rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    ids = np.arange(args.n, dtype=np.int64)
    train_size = args.train_size or min(args.n, 100_000)
    nprobes, ivf_common = ints(args.nprobe), dict(nlist=args.nlist, train_size=train_size)
    builds = {"flat": [("flat", "flat", {}, [{}])]}  # type -> [(label, build_index type, build kwargs, searches)]
    builds["ivf"] = [("ivf", "ivf", ivf_common, [{"nprobe": p} for p in nprobes])]
    builds["ivf_sq8"] = [("ivf_sq8", "ivf", {**ivf_common, "encoding": "SQ8"}, [{"nprobe": p} for p in nprobes])]
    builds["ivf_pq"] = [(f"ivf_pq{m}", "ivf_pq", {**ivf_common, "pq_m": m},
                         [{"nprobe": p, "refine_k_factor": float(kf)} for p in nprobes for kf in ints(args.k_factor)])
                        for m in ints(args.pq_m)]
    builds["hnsw"] = [("hnsw", "hnsw", dict(hnsw_m=args.hnsw_m, ef_construction=200),
                       [{"ef_search": args.ef}])]
    wanted = ["flat", *[t for t in args.types.split(",") if t and t != "flat"]]
    results: dict[str, dict] = {}
    truth = best = None

    def record(name: str, params: dict, build_s: float, timings: list[float], found: np.ndarray) -> None:
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())]))
        r = results[name] = {"params": params, "build_s": round(build_s, 2), "query_100_s": round(min(timings), 4),
                             "query_100_s_median": round(statistics.median(timings), 4),
                             "recall@10_vs_flat": round(recall, 4), "load_average": round(os.getloadavg()[0], 2)}
        if best is not None:
            r["speedup_vs_flat"] = round(results["flat"]["query_100_s"] / min(timings), 1)
            r["speedup_vs_flat_median"] = round(results["flat"]["query_100_s_median"] / statistics.median(timings), 1)
            r["speedup_vs_best_exact"] = round(best["min"] / min(timings), 1)
            r["speedup_vs_best_exact_median"] = round(best["median"] / statistics.median(timings), 1)
        print(f"{name:32s} build {r['build_s']:7.1f}s  100 queries min {r['query_100_s']:.4f}s "
              f"median {r['query_100_s_median']:.4f}s  recall@10 {r['recall@10_vs_flat']:.3f}  "
              f"speedup {r.get('speedup_vs_flat', 1.0)}x (median {r.get('speedup_vs_flat_median', 1.0)}x; "
              f"vs best exact {r.get('speedup_vs_best_exact', 1.0)}x / {r.get('speedup_vs_best_exact_median', 1.0)}x)"
              f"  load {r['load_average']:.2f}  rss {rss_gb()[0]:.1f} GB (peak {rss_gb()[1]:.1f})", flush=True)

    for kind in wanted:
        for label, index_type, kwargs, searches in builds[kind]:
            start = time.perf_counter()
            index = build_index(db, ids, index_type, **kwargs)
            build_s = time.perf_counter() - start
            for search in searches:
                set_search_params(index, index_type, search)
                timings, found = timed_search(index, queries, args.repeats)
                if label == "flat":
                    del index  # its copy of the database: numpy searches the caller's array
                    release_memory()
                    truth = found
                    record("flat", {}, build_s, timings, found)
                    np_timings, np_found = numpy_exact(db, queries, args.repeats)
                    record("flat_numpy", {}, 0.0, np_timings, np_found)
                    best = {"min": min(min(timings), min(np_timings)),
                            "median": min(statistics.median(timings), statistics.median(np_timings))}
                else:
                    record(label + "".join(f" {k.replace('refine_', '')}={v:g}" for k, v in search.items()),
                           {**kwargs, **search}, build_s, timings, found)
            index = None
            release_memory()
    report = {"n": args.n, "dim": args.dim, "data": args.data, "queries": args.queries, "repeats": args.repeats,
              "threads": faiss.omp_get_max_threads(), "load_average_start": round(load_start[0], 2),
              "load_average": round(os.getloadavg()[0], 2), "peak_rss_gb": round(rss_gb()[1], 2), "results": results}
    disk.write_json(args.out or Path(__file__).parent / "results" / f"index_{args.n}.json", report)
    print(f"n={args.n} dim={args.dim} threads={report['threads']} load average {load_start[0]:.2f} -> "
          f"{report['load_average']:.2f}")


if __name__ == "__main__":
    main()
