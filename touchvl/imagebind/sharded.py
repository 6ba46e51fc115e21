"""Sharded embedding on a Dask cluster through prefect-dask (``embed.runner: dask``).

The pairs the cache does not have are cut into contiguous shards whose sizes are multiples of
the batch size, so every shard sees exactly the batches the single-process loop would; each shard
is a Prefect task on a ``DaskTaskRunner`` (an existing cluster at ``embed.dask_address``, or a
local cluster of ``embed.dask_workers`` processes).  Results are merged in uid order.  Each worker
builds the encoder from the same :class:`EncoderSpec` (same weights, same seed) once and keeps it.

A lost worker is retried by Prefect; a file that does not decode is not an infrastructure error and
comes back as a per-pair error (reported with its path and uid by the embed stage), never retried.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from prefect import flow, task
from prefect_dask import DaskTaskRunner

from touchvl.imagebind.embedding import PairEmbedder, embed_pairs
from touchvl.imagebind.encoder import EncoderSpec, ImageBindEncoder

Rows = list[tuple[int, str, str]]


def shard_rows(rows: Rows, shards: int, batch_size: int) -> list[Rows]:
    """Contiguous pieces, each a whole number of batches (the last may be short), none empty."""
    batches = math.ceil(len(rows) / batch_size)
    per_shard = math.ceil(batches / max(1, min(shards, batches))) * batch_size
    return [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)]


@functools.lru_cache(maxsize=2)
def _worker_encoder(spec: EncoderSpec) -> ImageBindEncoder:
    return ImageBindEncoder(spec)


@task(retries=2, retry_delay_seconds=2, task_run_name="embed-shard-{index}")
def embed_shard(spec: EncoderSpec, rows: Rows, batch_size: int, index: int):
    return embed_pairs(_worker_encoder(spec), rows, batch_size, num_workers=0)


@flow(name="embed-sharded")
def embed_sharded(spec: EncoderSpec, rows: Rows, batch_size: int, shards: int):
    futures = [embed_shard.submit(spec, piece, batch_size, i) for i, piece in enumerate(shard_rows(rows, shards, batch_size))]
    merged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[str] = []
    for future in futures:
        vectors, shard_errors = future.result()
        merged.update(vectors)
        errors += shard_errors
    return dict(sorted(merged.items())), errors


def task_runner(address: str | None, n_workers: int) -> DaskTaskRunner:
    if address:
        return DaskTaskRunner(address=address)
    # one thread per worker process: torch already uses every core it is given
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def sharded_embedder(spec: EncoderSpec, batch_size: int, address: str | None = None, n_workers: int = 2,
                     shards: int | None = None) -> PairEmbedder:
    """An ``embed_fn`` for :func:`touchvl.imagebind.embedding.compute_embeddings` that runs the shards on Dask."""
    runner = task_runner(address, n_workers)
    pieces = shards or n_workers

    def embed(rows: Rows):
        return embed_sharded.with_options(task_runner=runner)(spec, rows, batch_size, pieces)

    return embed
