"""The retrieval gallery: a self-contained HTML page of tactile queries beside their top RGB results."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd

from touchvl.chat.messages import jpeg_data_url


def thumbnail(path: str, size: int = 112) -> str:
    """A JPEG data URL at most ``size`` pixels a side; empty (no picture) when the file cannot be read."""
    try:
        return jpeg_data_url(path, size, quality=85)
    except OSError:
        return ""


def true_match_rank(query: np.ndarray, gallery: np.ndarray, gallery_sources: np.ndarray, source_id: int) -> int | None:
    """1-based rank of the query's own item among the gallery's distinct source ids (by each source's best
    cosine, as the de-duplicating retriever ranks them); None when the item is not in the gallery."""
    scores = gallery @ (query / max(float(np.linalg.norm(query)), 1e-12))
    best: dict[int, float] = {}
    for source, score in zip(gallery_sources.tolist(), scores.tolist()):
        best[source] = max(score, best.get(source, -2.0))
    if source_id not in best:
        return None
    return 1 + sum(score > best[source_id] for source, score in best.items() if source != source_id)


def gallery_html(queries: list[tuple[pd.Series, list]], title: str, true_ranks: list[int | None] | None = None) -> str:
    """Self-contained page: each query's tactile image and its own RGB photo beside its top-k RGB hits, the true
    match marked, and where the true match ranks when it is not among them."""
    rows = []
    true_ranks = true_ranks or [None] * len(queries)
    for (query, hits), true_rank in zip(queries, true_ranks):
        cells = []
        for rank, hit in enumerate(hits, start=1):
            true = hit.source_id == int(query["source_id"])
            cells.append(
                f'<td class="hit{" true" if true else ""}"><img src="{thumbnail(hit.rgb_path)}" alt="uid {hit.uid}">'
                f'<div>#{rank} uid {hit.uid} · cos {hit.score:.3f}{" ✔ true match" if true else ""}</div>'
                f'<div class="cap">{html.escape(hit.caption)}</div></td>')
        rank_note = f"true match: rank {true_rank}" if true_rank else "true match: not in the gallery"
        rows.append(
            f'<tr><td class="query"><img src="{thumbnail(query["tac_path"])}" alt="query uid {query["uid"]}">'
            f'<div>query uid {query["uid"]} (sensor {query["sensor_id"]})</div>'
            f'<div class="cap">{html.escape(str(query["caption"]))}</div></td>'
            f'<td class="own"><img src="{thumbnail(query["rgb_path"])}" alt="its own photo, uid {query["uid"]}">'
            f'<div>its own photo</div><div class="rank">{rank_note}</div></td>'
            f'{"".join(cells) or "<td>no hit above min_cos</td>"}</tr>')
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:1em}} td{{vertical-align:top;padding:6px;width:120px;font-size:12px}}
td.query{{background:#eef}} td.own{{background:#efe}} td.true{{outline:3px solid #2a2}} .cap{{color:#555}}
.rank{{font-weight:bold}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Tactile query (left), its own RGB photo and where that photo ranks, then the top
RGB results; the true match has a green frame.</p>
<table>{"".join(rows)}</table></body></html>
"""
