"""DVC's plots rendered offline: one self-contained HTML page (Vega, Vega-Lite and Vega-Embed bundled inline,
no CDN) and a PNG per plot, through vl-convert.  ``dvc plots show`` writes a page that loads Vega from a CDN,
blank without network; this one opens anywhere.

    touchvl plots                      # the workspace's plots -> artifacts/reports/plots/
    touchvl plots HEAD                 # the workspace against a revision (DVC's plots diff), one colour each
    touchvl plots --template           # `dvc plots show|diff` themselves render offline from now on

``--template`` writes ``.dvc/plots_offline.html``, an HTML template for dvc-render with the same bundle inline,
and points ``plots.html_template`` at it in ``.dvc/config.local`` (``make repro`` does it).  dvc-render puts
its renderers' CDN ``<script src>`` tags where a template says ``{scripts}``; this one says it nowhere, so the
page keeps only the inline bundle, which defines the ``vegaEmbed`` global DVC's plot divs call.
"""
from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

from touchvl import disk
from touchvl.errors import StageError


def dvc_plot_specs(repo: Path, revisions: list[str]) -> dict[str, dict]:
    """Vega-Lite spec of every plot DVC knows, with its data inlined (``dvc plots show|diff --json``)."""
    dvc = Path(sys.executable).parent / "dvc"
    cmd = [str(dvc), "plots", "diff", *revisions, "--json"] if revisions else [str(dvc), "plots", "show", "--json"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode:
        raise StageError(f"`{' '.join(cmd[1:])}` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    out = json.loads(proc.stdout or "{}")
    specs = {}
    for path, entries in (out.get("data") or {}).items():
        for entry in entries:
            if entry.get("type") == "vega" and isinstance(entry.get("content"), dict):
                specs[path] = entry["content"]
    return specs


def short_title(path: str) -> str:
    """``artifacts/metrics/projector_stage1/plots/metrics/val/R@1.tsv`` -> ``projector_stage1: val/R@1``."""
    match = re.search(r"([^/]+)/plots/metrics/(.+)\.tsv$", path)
    return f"{match.group(1)}: {match.group(2)}" if match else path


def render(specs: dict[str, dict], out_dir: Path) -> list[Path]:
    """index.html (one inline bundle for every plot) and one PNG per plot under ``out_dir``."""
    import vl_convert as vlc

    if not specs:
        raise StageError("no plots: run the pipeline first (`dvc repro`)")
    written, divs, embeds = [], [], []
    first = ("loss", "R@1", "tau", "lr")  # what a researcher reads first, then the rest by name

    def order(item):
        path = item[0]
        return (re.sub(r"/plots/metrics/.*", "", path), next((i for i, k in enumerate(first) if k in path), len(first)), path)

    for i, (path, spec) in enumerate(sorted(specs.items(), key=order)):
        # "~g" ticks: with d3's default a constant series (a fixed tau of 0.07) gets one tick labelled "0"
        config = {**spec.get("config", {}), "axisY": {**spec.get("config", {}).get("axisY", {}), "format": "~g"}}
        spec = {**spec, "title": {"text": short_title(path), "anchor": "middle"}, "config": config}
        name = re.sub(r"[^A-Za-z0-9]+", "_", short_title(path)).strip("_") + ".png"
        disk.write_bytes(out_dir / name, vlc.vegalite_to_png(spec, scale=1.5))
        written.append(out_dir / name)
        divs.append(f'<div class="plot" id="plot{i}"></div>')
        embeds.append(f"vegaEmbed('#plot{i}', {json.dumps(spec)}, {{actions: false}});")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>plots</title>
<style>body{{font-family:sans-serif;margin:1em}} .plot{{display:inline-block;margin:8px}}</style>
<script>{vlc.javascript_bundle()}</script></head><body><h1>Pipeline curves</h1>
{html.escape("Rendered offline from `dvc plots` (Vega bundled in this page).")}
<div>{"".join(divs)}</div><script>{"".join(embeds)}</script></body></html>
"""
    disk.write_text(out_dir / "index.html", page)
    return [out_dir / "index.html", *written]


TEMPLATE_NAME = "plots_offline.html"  # in .dvc/, beside config.local (DVC resolves a relative template there)
# dvc-render's placeholders: the plot divs (required) and the refresh tag (`dvc plots show --open` live pages);
# `{scripts}`, where it would put the CDN tags, is left out on purpose
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite and Vega-Embed bundled inline (vl-convert): this page needs no network -->
    <script>BUNDLE</script>
    <style>table { border-spacing: 15px; }</style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    """DVC's page template with the Vega libraries inline instead of loaded from a CDN."""
    import vl_convert as vlc

    bundle = vlc.javascript_bundle()
    # the bundle is pasted into an inline <script> and then into dvc-render's str.replace placeholders: text that
    # would close the tag early or be taken for a placeholder would break the page, so refuse it loudly
    clash = [s for s in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}") if s in bundle]
    if clash:
        raise StageError(f"vl-convert's Vega bundle contains {clash}: it cannot be inlined into a DVC template")
    return TEMPLATE.replace("BUNDLE", bundle)


def install_template(repo: Path) -> Path:
    """Write ``.dvc/plots_offline.html`` and set it as this clone's ``plots.html_template`` (``.dvc/config.local``:
    a per-clone setting, like the template, which is generated and git-ignored)."""
    dvc_dir = Path(repo) / ".dvc"
    if not dvc_dir.is_dir():
        raise StageError(f"{repo}: not a DVC repository (no .dvc/ folder)")
    target = dvc_dir / TEMPLATE_NAME
    disk.write_text(target, offline_template())
    dvc = Path(sys.executable).parent / "dvc"
    cmd = [str(dvc), "config", "--local", "plots.html_template", TEMPLATE_NAME]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode:
        raise StageError(f"`{' '.join(cmd[1:])}` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return target
