"""The retrieval gallery: a self-contained HTML page of tactile queries beside their top RGB results."""
from __future__ import annotations

import base64
import html
import io

import pandas as pd
from PIL import Image


def thumbnail(path: str, size: int = 112) -> str:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
    except OSError:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery_html(queries: list[tuple[pd.Series, list]], title: str) -> str:
    """Self-contained page: each query's tactile image beside its top-k RGB hits, true match marked."""
    rows = []
    for query, hits in queries:
        cells = []
        for rank, hit in enumerate(hits, start=1):
            true = hit.source_id == int(query["source_id"])
            cells.append(
                f'<td class="hit{" true" if true else ""}"><img src="{thumbnail(hit.rgb_path)}" alt="uid {hit.uid}">'
                f'<div>#{rank} uid {hit.uid} · cos {hit.score:.3f}{" ✔ true match" if true else ""}</div>'
                f'<div class="cap">{html.escape(hit.caption)}</div></td>')
        rows.append(
            f'<tr><td class="query"><img src="{thumbnail(query["tac_path"])}" alt="query uid {query["uid"]}">'
            f'<div>query uid {query["uid"]} (sensor {query["sensor_id"]})</div>'
            f'<div class="cap">{html.escape(str(query["caption"]))}</div></td>{"".join(cells) or "<td>no hit above min_cos</td>"}</tr>')
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:1em}} td{{vertical-align:top;padding:6px;width:120px;font-size:12px}}
td.query{{background:#eef}} td.true{{outline:3px solid #2a2}} .cap{{color:#555}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Tactile query (left) and its top RGB results; the true match has a green frame.</p>
<table>{"".join(rows)}</table></body></html>
"""
