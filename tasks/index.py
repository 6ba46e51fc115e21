"""DVC stage ``index``: FAISS indexes over the RGB and projected-tactile databases, retrieval metrics, gallery.

Builds ``artifacts/index/rgb.faiss`` (raw ImageBind RGB vectors; accepts raw or projected queries) and
``artifacts/index/tac_projected.faiss`` (projected tactile vectors), each with a metadata JSON; unchanged
indexes are updated incrementally (core: touchvl.retrieval).  ``python -m tasks.index search ...`` is an alias
of ``touchvl search ...``.
"""
from __future__ import annotations

import importlib
import logging
import sys
import time

import numpy as np

from touchvl import disk
from touchvl.devices import apply_threads
from touchvl import checks  # light: Great Expectations is imported only when it runs
from touchvl.logs import run_stage
from touchvl.params import Params
from touchvl.retrieval.build import load_databases, retrieval_metrics, save_database, update_or_build, validation_tables
from touchvl.retrieval.gallery import gallery_html, true_match_rank
from touchvl.retrieval.index import QuerySpace, Retriever, normalize, search_params

log = logging.getLogger(__name__)


def run(params: Params) -> dict:

    p = params.index
    # a killed run's half-written temporaries, before DVC could record them as part of an output
    disk.remove_stale_temps(p.out_dir, p.gallery, p.metrics, p.build_report, *checks.report_paths("index", params.validation))
    apply_threads(p.threads)  # faiss is imported by now: its OpenMP pool too
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    rgb, tac, encoder_meta = load_databases(params.embed.out_dir)
    report = {}
    indexes = {}
    for db in (rgb, tac):
        start = time.perf_counter()
        index, meta, how = update_or_build(db, p, p.out_dir)
        indexes[db.name] = (index, meta)
        # the metric holds what was built, not how long it took: same inputs, same bytes (timings go to the log)
        report[db.name] = {**how, "count": index.ntotal}
        log.info("index %s: %s (+%d -%d) -> %d vectors in %.2f s", db.name, how["mode"], how["added"], how["removed"],
                 index.ntotal, time.perf_counter() - start)
    checks.run_validation("index", validation_tables([(*indexes[db.name], db) for db in (rgb, tac)],
                                                     encoder_meta["fingerprint"]), params.validation).raise_if_failed()
    for db in (rgb, tac):
        save_database(*indexes[db.name], db, p.out_dir)
    test = disk.evaluation_rows(manifest)
    metrics = {"counts": {name: r["count"] for name, r in report.items()},
               "tac_to_rgb": retrieval_metrics(indexes["rgb"][0], rgb, tac, test["uid"].to_numpy(np.int64), p)}
    disk.write_json(p.metrics, metrics)
    disk.write_json(p.build_report, report)
    retriever = Retriever(*indexes["rgb"], manifest)
    query_rows = test.sort_values("uid").head(p.gallery_queries)
    rows = {uid: i for i, uid in enumerate(tac.ids.tolist())}
    space = QuerySpace("projected", tac.vectors.shape[1], tac.encoder_fingerprint, tac.projector_hash)
    vectors = tac.vectors[[rows[u] for u in query_rows["uid"]]]
    hits = retriever.search(vectors, space, search_params(p))
    sources = manifest.set_index("uid").loc[rgb.ids, "source_id"].to_numpy()
    gallery = normalize(rgb.vectors)
    ranks = [true_match_rank(v, gallery, sources, int(s)) for v, s in zip(vectors, query_rows["source_id"])]
    disk.write_text(p.gallery, gallery_html(list(zip((r for _, r in query_rows.iterrows()), hits)),
                                            gallery_title(encoder_meta), ranks))
    return {**metrics, "build": report}


def gallery_title(encoder_meta: dict) -> str:
    title = "Tactile → RGB retrieval (test split)"
    if encoder_meta.get("smoke"):  # a smoke encoder's results must never pass for real ones
        title += f" · SMOKE ENCODER {encoder_meta.get('encoder', '')}: {encoder_meta.get('note', '')}"
    return title


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["search"]:  # the former `python -m tasks.index search`: now `touchvl search`
        cli = importlib.import_module("touchvl.cli").main  # at run time: the alias is not part of the stage's deps
        sys.exit(cli(["-C", ".", *argv]))

    def body(params: Params, args) -> None:
        metrics = run(params)
        log.info("tactile->RGB on test: %s", metrics["tac_to_rgb"]["index"])

    run_stage("index", __doc__, body, argv, start=checks.stage_starts)


if __name__ == "__main__":
    main()
