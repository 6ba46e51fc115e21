"""DVC stage ``embed``: ImageBind embeddings of every tactile image, RGB image and caption in the manifest.

Reads ``data/prepared/manifest.csv``; writes ``embeddings/embeddings_{tac,rgb,text}/``, ``sensor_ids.npy``,
``meta.json`` (encoder fingerprint) and ``artifacts/reports/embed/summary.json`` (embedded now vs cached).
Everything is computed and validated before anything is written (core: touchvl.imagebind.embedding).
"""
from __future__ import annotations

import logging

from touchvl import checks, disk, headline
from touchvl.devices import apply_threads
from touchvl.imagebind.cache import VectorCache
from touchvl.imagebind.embedding import (EmbeddingSet, cached_text_vectors, compute_embeddings, default_batch_size,
                                         default_num_workers, embed_pairs, validation_tables, write_embeddings)
from touchvl.imagebind.encoder import ImageBindEncoder, encoder_spec
from touchvl.imagebind.quality import encoder_metrics
from touchvl.logs import run_stage
from touchvl.params import Params

log = logging.getLogger(__name__)
VALIDATION_RECORDS = "validation"  # under embed.cache_dir (persisted by DVC): passing validations to replay


def run(params: Params) -> EmbeddingSet:
    # A fully cached rerun imports neither torch nor Great Expectations (seconds each, more than the work): the
    # encoder is lazy (its fingerprint needs no model), images are embedded only on a cache miss, the text
    # queries of the metrics are cached like captions, and a validation of identical vectors is replayed.
    p = params.embed
    # a killed run's half-written temporaries, before DVC could record them as part of an output
    disk.remove_stale_temps(*(p.out_dir / f"embeddings_{m}" for m in ("tac", "rgb", "text")), p.cache_dir,
                            p.out_dir / "sensor_ids.npy", p.out_dir / "meta.json", p.metrics, p.headline, p.text_search,
                            p.summary, *checks.report_paths("embed", params.validation))
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    encoder = ImageBindEncoder(encoder_spec(p), lazy=True)
    if encoder.is_smoke:
        log.warning("embed.encoder=imagebind_tiny: smoke encoder, embeddings are for smoke runs only")
    cache = VectorCache(p.cache_dir, encoder.fingerprint)
    # OMP_NUM_THREADS for torch if it gets imported (no decoding workers assumed: resolving the default needs the
    # device, hence torch); embed_missing resizes the pool once it knows the workers
    apply_threads(p.threads, p.num_workers or 0)

    def embed_missing(rows):  # only on a cache miss: the device, the model and any Dask cluster start here
        checks.start_background_gx(params.validation)  # new vectors: their validation cannot be a replay
        workers = default_num_workers(encoder.device) if p.num_workers is None else p.num_workers
        batch_size = p.batch_size or default_batch_size(encoder.device)
        apply_threads(p.threads, workers)  # the decoding workers run one thread each (one_thread_worker)
        if p.runner == "dask":
            from touchvl.imagebind.sharded import sharded_embedder  # prefect-dask is needed only for this runner

            return sharded_embedder(encoder_spec(p), batch_size, address=p.dask_address,
                                    n_workers=p.dask_workers, shards=p.shards)(rows)
        return embed_pairs(encoder, rows, batch_size, workers)

    result = compute_embeddings(manifest, encoder, cache, embed_fn=embed_missing)
    report = checks.run_validation("embed", validation_tables(result, manifest), params.validation,
                                   replay_dir=p.cache_dir / VALIDATION_RECORDS)
    report.raise_if_failed()
    write_embeddings(result, p.out_dir)
    seen, detail = quality(result, manifest, encoder, cache)
    disk.write_json(p.metrics, seen)
    disk.write_json(p.headline, headline.encoder(seen))
    disk.write_json(p.text_search, detail)
    disk.write_json(p.summary, {"pairs": len(result.uids), "embedded_now": result.embedded_now,
                                "from_cache": len(result.uids) - result.embedded_now,
                                "fingerprint": result.meta["fingerprint"],
                                # which preprocessing made the vectors (meta.json has it as "preprocess" too)
                                "decode": "fast" if p.fast_decode else "exact", "preprocess": result.meta["preprocess"],
                                # a passing validation of identical vectors, replayed without Great Expectations
                                "validation_replayed_from": report.replayed_from})
    return result


def quality(result: EmbeddingSet, manifest, encoder: ImageBindEncoder, cache: VectorCache) -> tuple[dict, dict]:
    """Encoder metrics on the test originals (what the encoder sees before any projector)."""
    test = disk.evaluation_rows(manifest)
    if test.empty:
        return {"gallery": 0}, {}
    row = {int(u): i for i, u in enumerate(result.uids)}
    pick = [row[int(u)] for u in test["uid"]]
    v = result.vectors
    return encoder_metrics(v["tac"][pick], v["rgb"][pick], v["text"][pick], test["caption"].tolist(),
                           lambda texts: cached_text_vectors(encoder, cache, texts))


def main(argv: list[str] | None = None) -> None:
    def body(params: Params, args) -> None:
        result = run(params)
        log.info("embedded %d pairs (dim %d, %d newly computed) -> %s",
                 len(result.uids), result.meta["dim"], result.embedded_now, params.embed.out_dir)

    run_stage("embed", __doc__, body, argv, start=checks.stage_may_start)


if __name__ == "__main__":
    main()
