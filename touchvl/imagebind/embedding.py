"""ImageBind embeddings of every tactile image, RGB image and caption in the manifest (the ``embed`` stage's core).

Writes, in the layout the original toolkit's tools read (row i of every file is manifest uid
``all_indices[i]``; tac and rgb share one index order)::

    embeddings/embeddings_tac/all_embeddings.npy   [N, D] float32, L2-normalised
    embeddings/embeddings_tac/all_indices.npy      [N] int64 (manifest uid)
    embeddings/embeddings_rgb/...                  same
    embeddings/embeddings_text/...                 caption embeddings, same order
    embeddings/sensor_ids.npy                      [N] int64
    embeddings/meta.json                           encoder fingerprint, dim, count, normalised, smoke
    artifacts/reports/embed/summary.json           this run: pairs embedded now vs taken from the cache

Vectors are cached under ``embeddings/cache/<fingerprint>/`` keyed by content hash, so a rerun
embeds only new or changed images.  Everything is computed before anything is written: a file that
no longer decodes fails the stage with its path and uid and leaves the previous outputs in place.

torch is imported only where images or texts are really embedded: a rerun whose every vector is cached hashes
the files, reads the cache and assembles the arrays with numpy alone (the encoder is built lazily, too).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from touchvl import disk
from touchvl.devices import one_thread_worker, usable_cpus
from touchvl.imagebind.encoder import ImageBindEncoder, smoke_note
from touchvl.imagebind.preprocess import Preprocess, preprocess_image
from touchvl.errors import StageError
from touchvl.imagebind.cache import VectorCache, image_key, text_key

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
MODALITIES = ("tac", "rgb", "text")


class EmbedError(StageError):
    pass


@dataclass
class EmbeddingSet:
    """The stage's result: one row per manifest uid, in manifest order."""

    uids: np.ndarray  # int64 [N]
    sensor_ids: np.ndarray  # int64 [N]
    vectors: dict[str, np.ndarray]  # modality -> float32 [N, D]
    meta: dict  # what decides the vectors (meta.json): the same whenever the vectors are the same
    embedded_now: int = 0  # pairs this run computed rather than took from the cache


class _PairImages:
    """Decodes and preprocesses the tactile and RGB image of each pair (in DataLoader workers, or a thread).

    A plain map-style dataset (``__len__`` + ``__getitem__`` is all DataLoader asks), not a torch ``Dataset``
    subclass, so defining it does not import torch."""

    def __init__(self, rows: list[tuple[int, str, str]], preprocess: Preprocess = preprocess_image):
        self.rows = rows
        self.preprocess = preprocess  # a module-level function: pickles cheaply into spawned workers

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        import torch

        uid, tac_path, rgb_path = self.rows[i]
        tensors = []
        for path in (tac_path, rgb_path):
            try:
                with Image.open(path) as img:
                    tensors.append(self.preprocess(img))
            except Exception as exc:  # reported with path and uid by the caller, never swallowed
                return uid, None, f"{path}: {type(exc).__name__}: {exc}"
        return uid, torch.stack(tensors), None


def _stack(items):
    """Collate in the worker: (uids, one [2B, 3, 224, 224] tensor or None, [(uid, error)]).

    Stacking here, not in the main process, keeps a 77 MB copy per GPU batch off the loop that feeds the
    GPU, and one tensor can be pinned and copied to the device asynchronously.
    """
    import torch

    good = [(uid, pix) for uid, pix, err in items if err is None]
    errors = [(uid, err) for uid, pix, err in items if err is not None]
    return [uid for uid, _ in good], torch.cat([pix for _, pix in good]) if good else None, errors


def _worker_context():
    """Decoding workers start from a fork server, not as forks of this process.

    A forked worker inherits the parent's threading-atexit hooks. In a process that has run a Prefect flow or
    task (a Prefect-Dask worker, the flows' own process, a notebook) those include Prefect's log and event
    services, which assert at the worker's exit: every worker then ends with code 1 and the DataLoader raises
    after the last batch. The fork server is a fresh interpreter that imported this module once (the preload),
    so a worker still starts in milliseconds with torch and PIL already imported (named here: this module
    imports torch only when it embeds).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", __name__])
    return context


def pair_loader(rows: list[tuple[int, str, str]], preprocess: Preprocess, batch_size: int, num_workers: int,
                pin_memory: bool = False) -> Iterable[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Batches of (uids, pixels tac0, rgb0, tac1, ..., errors) decoded by ``num_workers`` processes, or with
    none, by one thread of this process a batch ahead (:func:`_batches_a_thread_ahead`)."""
    dataset = _PairImages(rows, preprocess)
    if not num_workers:
        return _batches_a_thread_ahead(dataset, batch_size, pin_memory)
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      collate_fn=_stack, shuffle=False, pin_memory=pin_memory,
                      worker_init_fn=one_thread_worker, multiprocessing_context=_worker_context(),
                      prefetch_factor=4)  # a few batches ahead: decode never waits on the GPU


def _batches_a_thread_ahead(dataset: _PairImages, batch_size: int, pin_memory: bool = False, ahead: int = 2):
    """The DataLoader's batches without worker processes (the same batches, in the same order): one thread
    decodes and preprocesses up to ``ahead`` batches while this one runs the forward.

    Why not ``DataLoader(num_workers=0)``: it decodes in the loop that runs the model, so on a CPU the two take
    turns on one core.  Why not worker processes there: on a small CPU their start-up and the pickled tensors
    cost more than they save (measured: bench/embed.py), and their cores are the forward's.  A thread costs
    neither, and Pillow's decode and resample and torch's ops release the GIL, so the next batch is decoded
    on another core while this one is embedded (bench/embed.py: ``batched_exact``)."""
    from collections import deque

    chunks = [range(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size)]

    def load(chunk: range):
        uids, pixels, errors = _stack([dataset[i] for i in chunk])
        return uids, (pixels.pin_memory() if pin_memory and pixels is not None else pixels), errors

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="touchvl-decode") as pool:
        pending = deque(pool.submit(load, chunk) for chunk in chunks[:ahead])
        queued = len(pending)
        while pending:
            batch = pending.popleft().result()
            if queued < len(chunks):
                pending.append(pool.submit(load, chunks[queued]))
                queued += 1
            yield batch


def default_batch_size(device: torch.device) -> int:
    # measured (bench/embed.py): on a 2-core CPU 4 pairs per forward is fastest; GPUs want big batches
    return 4 if device.type == "cpu" else 64


def default_num_workers(device: torch.device) -> int:
    # measured: on CPU, decoding workers steal cores from the forward and cost ~1.8x, where a decoding thread
    # (what 0 workers means: pair_loader) pays 1.9x; a GPU frees the cores for worker processes
    return 0 if device.type == "cpu" else min(8, usable_cpus())


def embed_pairs(encoder: ImageBindEncoder, rows: list[tuple[int, str, str]], batch_size: int,
                num_workers: int) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Embed (uid, tac_path, rgb_path) rows; each batch's tac and rgb images go through one forward.

    Returns {uid: (tac_vector, rgb_vector)} and the decode errors ("path: reason (uid N)").
    """
    loader = pair_loader(rows, encoder.preprocess, batch_size, num_workers,
                         pin_memory=encoder.device.type == "cuda")
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[str] = []
    with tqdm(total=len(rows), desc="embed images", unit="pair") as bar:
        for uids, pixels, failed in loader:
            errors += [f"{err} (uid {uid})" for uid, err in failed]
            if uids:
                vectors = encoder.encode_images(pixels).numpy()
                for j, uid in enumerate(uids):
                    out[uid] = (vectors[2 * j], vectors[2 * j + 1])
            bar.update(len(uids) + len(failed))
    return out, errors


PairEmbedder = Callable[[list[tuple[int, str, str]]], tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[str]]]


def compute_embeddings(manifest: pd.DataFrame, encoder: ImageBindEncoder, cache: VectorCache,
                       batch_size: int | None = None, num_workers: int | None = None,
                       embed_fn: PairEmbedder | None = None) -> EmbeddingSet:
    """Look every image and caption up in the cache, embed the misses, assemble manifest-ordered arrays.

    ``embed_fn`` embeds the missing pairs (default: :func:`embed_pairs` in this process, ``None`` sizes chosen
    for the encoder's device; the Dask runner shards them over a cluster and returns the same mapping). Neither
    is called, nor the encoder's model built, when every vector is cached.
    """
    paths = sorted(set(manifest["tac_path"]) | set(manifest["rgb_path"]))
    with ThreadPoolExecutor(max_workers=4) as pool:
        keys = dict(zip(paths, tqdm(pool.map(_safe_image_key, paths), total=len(paths), desc="hash images", unit="file")))
    missing_files = [f"{p}: {k}" for p, k in keys.items() if k.startswith("error:")]
    if missing_files:
        raise EmbedError("cannot read image(s) listed in the manifest:\n  " + "\n  ".join(missing_files[:20]))
    todo: list[tuple[int, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for r in manifest.itertuples():
        pair = (keys[r.tac_path], keys[r.rgb_path])
        # one forward per distinct content: an unchanged file is never embedded twice
        if pair in seen or (pair[0] in cache and pair[1] in cache):
            continue
        seen.add(pair)
        todo.append((int(r.uid), r.tac_path, r.rgb_path))
    log.info("images: %d pairs, %d to embed (%d cached vectors)", len(manifest), len(todo), len(cache))
    if todo:
        if embed_fn is None:
            embed_fn = partial(embed_pairs, encoder,
                               batch_size=batch_size or default_batch_size(encoder.device),
                               num_workers=default_num_workers(encoder.device) if num_workers is None else num_workers)
        embedded, errors = embed_fn(todo)
        for uid, tac_path, rgb_path in todo:
            if uid in embedded:
                cache.put(keys[tac_path], embedded[uid][0])
                cache.put(keys[rgb_path], embedded[uid][1])
        cache.flush()  # keep what decoded even if the stage fails below
        if errors:
            raise EmbedError(f"{len(errors)} image(s) failed to decode (changed since prepare?):\n  "
                             + "\n  ".join(errors[:20]))
    cached_text_vectors(encoder, cache, sorted(set(manifest["caption"].astype(str))))
    vectors = {
        "tac": np.stack([cache.get(keys[p]) for p in manifest["tac_path"]]),
        "rgb": np.stack([cache.get(keys[p]) for p in manifest["rgb_path"]]),
        "text": np.stack([cache.get(text_key(str(c))) for c in manifest["caption"]]),
    }
    meta = {**encoder.fingerprint_info(), "fingerprint": encoder.fingerprint, "dim": encoder.dim,
            "count": len(manifest), "normalized": True,
            "note": smoke_note(encoder.fingerprint_info())}
    return EmbeddingSet(manifest["uid"].to_numpy(np.int64), manifest["sensor_id"].to_numpy(np.int64),
                        {m: v.astype(np.float32) for m, v in vectors.items()}, meta, embedded_now=len(todo))


def cached_text_vectors(encoder: ImageBindEncoder, cache: VectorCache, texts: list[str],
                        batch_size: int = 64) -> np.ndarray:
    """[len(texts), D] text-tower vectors, each looked up by its text's key and encoded (in batches) only when
    missing. Captions and the quality metrics' adjective queries both come through here: same text, same
    encoder namespace, same vector, so a cached rerun needs no text tower. Persists what it computed."""
    missing = sorted({t for t in texts if text_key(t) not in cache})
    for start in tqdm(range(0, len(missing), batch_size), desc="embed texts", unit="batch", disable=not missing):
        chunk = missing[start:start + batch_size]
        for text, vector in zip(chunk, encoder.encode_texts(chunk).numpy()):
            cache.put(text_key(text), vector)
    cache.flush()
    return np.stack([cache.get(text_key(t)) for t in texts]) if texts else np.zeros((0, encoder.dim), np.float32)


def _safe_image_key(path: str) -> str:
    try:
        return image_key(path)
    except OSError as exc:
        return f"error: {exc}"


def write_embeddings(result: EmbeddingSet, out_dir: Path) -> None:
    for modality in MODALITIES:
        disk.write_vectors(out_dir / f"embeddings_{modality}", result.vectors[modality], result.uids)
    disk.save_npy(out_dir / "sensor_ids.npy", result.sensor_ids)
    disk.write_json(out_dir / "meta.json", result.meta)


def validation_tables(result: EmbeddingSet, manifest: pd.DataFrame) -> list:
    from touchvl import checks

    gxe = checks.expect  # declared as data, not GX objects: a rerun on identical vectors replays without GX
    critical = dict(severity="critical")
    rows = pd.DataFrame({"uid": result.uids})
    for modality, vectors in result.vectors.items():
        rows[f"{modality}_finite"] = np.isfinite(vectors).all(axis=1)
        rows[f"{modality}_norm"] = np.linalg.norm(np.nan_to_num(vectors), axis=1)
    vector_checks = [gxe.ExpectColumnValuesToBeUnique(column="uid", **critical)]
    for modality in MODALITIES:
        vector_checks += [
            gxe.ExpectColumnValuesToBeInSet(column=f"{modality}_finite", value_set=[True], **critical),
            gxe.ExpectColumnValuesToBeBetween(column=f"{modality}_norm", min_value=0.999, max_value=1.001,
                                              severity="critical" if modality != "text" else "warning"),
        ]
    shapes = pd.DataFrame([{"array": m, "rows": v.shape[0], "dim": v.shape[1] if v.ndim == 2 else -1,
                            "dtype": str(v.dtype), "index_rows": len(result.uids)}
                           for m, v in result.vectors.items()])
    shape_checks = [
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["float32"], **critical),
        gxe.ExpectColumnValuesToBeInSet(column="dim", value_set=[result.meta["dim"]], **critical),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="rows", column_B="index_rows", **critical),
    ]
    coverage = pd.DataFrame({"uid": manifest["uid"].to_numpy(np.int64)})
    coverage_checks = [gxe.ExpectColumnValuesToBeInSet(column="uid", value_set=result.uids.tolist(), **critical)]
    # the norm and finiteness columns summarise the vectors: a changed vector can keep its float32 norm, so the
    # vectors themselves (and the uids) go into the replay key too
    sources = (result.uids, *(result.vectors[m] for m in MODALITIES))
    return [checks.Table("vectors", rows, vector_checks, id_column="uid", derived_from=sources),
            checks.Table("arrays", shapes, shape_checks, id_column="array"),
            checks.Table("manifest_coverage", coverage, coverage_checks, id_column="uid")]
