"""`dvc plots show` itself renders offline once `touchvl plots --template` has run: real DVC, a throwaway repo."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import CHROMIUM_FLAGS, NO_BROWSER, chromium_path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# this checkout's touchvl (`python -m touchvl`), whichever project the venv's editable install points at
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
TOUCHVL = [sys.executable, "-m", "touchvl"]
SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//", re.I)


def run(*args, cwd):
    proc = subprocess.run(list(args), cwd=cwd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def plot_repo(tmp_path):
    """A git + DVC repo with one top-level plot (a loss curve) and the files touchvl needs to find its root."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("{}\n")
    (repo / "dvc.yaml").write_text("plots:\n  - loss_curve:\n      x: step\n      y:\n        curve.tsv: loss\n")
    (repo / "curve.tsv").write_text("step\tloss\n0\t8.25\n1\t6.5\n2\t4.125\n")
    run("git", "init", "-q", cwd=repo)
    run(str(BIN / "dvc"), "init", "-q", cwd=repo)
    return repo


def show(repo: Path, out: str) -> str:
    run(str(BIN / "dvc"), "plots", "show", "-o", out, cwd=repo)
    return (repo / out / "index.html").read_text(encoding="utf-8")


def test_dvc_plots_show_inlines_vega_after_touchvl_plots_template(plot_repo):
    import vl_convert as vlc

    # as DVC ships it, the page loads Vega from a CDN: blank without network (what the template is for)
    assert SCRIPT_SRC.search(show(plot_repo, "before"))

    printed = run(*TOUCHVL, "-C", str(plot_repo), "plots", "--template", cwd=plot_repo).stdout
    template = plot_repo / ".dvc/plots_offline.html"
    assert str(template) in printed and template.is_file()
    configured = run(str(BIN / "dvc"), "config", "--local", "plots.html_template", cwd=plot_repo).stdout.strip()
    assert configured == "plots_offline.html"

    page = show(plot_repo, "after")
    assert not SCRIPT_SRC.search(page), "a <script src> to the network is left in the page"
    assert "cdn.jsdelivr.net" not in page
    assert vlc.javascript_bundle() in page  # Vega, Vega-Lite and Vega-Embed themselves, inline
    # the plot itself: DVC's div calling vegaEmbed with the curve's data in the spec
    assert "vegaEmbed(" in page and "8.25" in page and "4.125" in page


def test_a_template_outside_a_dvc_repository_is_a_one_line_error(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    proc = subprocess.run([*TOUCHVL, "-C", str(tmp_path), "plots", "--template"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "not a DVC repository" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / ".dvc").exists()


def test_the_offline_page_draws_the_plot_in_a_browser_with_no_request_off_the_page(plot_repo):
    """Inline is not enough if the bundle defined vegaEmbed too late: a real browser must draw the chart."""
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip(NO_BROWSER)
    from playwright.sync_api import expect, sync_playwright

    run(*TOUCHVL, "-C", str(plot_repo), "plots", "--template", cwd=plot_repo)
    show(plot_repo, "page")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            requests, errors = [], []
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto((plot_repo / "page/index.html").as_uri())
            expect(page.locator("svg, canvas").first).to_be_visible(timeout=30_000)  # Vega drew the chart
            assert errors == [] and [u for u in requests if not u.startswith("file:")] == []
        finally:
            browser.close()


def test_a_constant_curve_is_labelled_with_its_value(tmp_path):
    """A fixed tau (0.07 every epoch) is drawn with a tick reading 0.07, not d3's rounded '0'."""
    import json
    import re

    import vl_convert as vlc

    from touchvl.plots import render

    rows = [{"step": i, "tau": 0.07000000029802322, "rev": "workspace"} for i in range(1, 6)]
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"values": rows},
            "mark": "line", "encoding": {"x": {"field": "step", "type": "quantitative"},
                                         "y": {"field": "tau", "type": "quantitative", "scale": {"zero": False}}}}
    written = render({"artifacts/metrics/projector_stage1/plots/metrics/tau.tsv": spec}, tmp_path)
    (png,) = [path for path in written if path.suffix == ".png"]
    page = (tmp_path / "index.html").read_text()
    assert png.name == "projector_stage1_tau.png" and png.stat().st_size > 0
    drawn = re.search(r"vegaEmbed\('#plot0', (\{.*?\}), \{actions", page).group(1)
    svg = vlc.vegalite_to_svg(json.loads(drawn))
    assert ">0.07<" in svg and ">0<" not in svg
