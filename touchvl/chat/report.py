"""The review report of a chat fine-tuning file: ``report.json`` / ``report.md`` / ``report.html``.

The validator's findings and summary (:func:`report_dict`), the cost estimate, the composition of a generated
set (kinds, intents, quotas) with the Great Expectations suite over its example table, and sample chats with
their images rendered (report.html is self-contained).
"""
from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from touchvl import disk
from touchvl.chat.fetch import redact_urls
from touchvl.chat.generate import Example, quota_counts
from touchvl.chat.validate import Report, iter_lines, parse_line, printable, structure_problem


def _composition_html(d: dict) -> str:
    comp = d.get("composition")
    if not comp:
        return ""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in {**comp["kinds"], **comp["intents"]}.items())
    quotas = "".join(f"<tr><td>{html.escape(k)}</td><td>{q['share']:.0%}</td><td>{q['expected']}</td><td>{q['actual']}</td>"
                     f"<td>{'✔' if q['exact'] else '✘'}</td></tr>" for k, q in comp.get("quotas", {}).items())
    quota_table = (f"<h3>Quotas</h3><table><tr><th>kind</th><th>share</th><th>expected</th><th>actual</th><th>exact</th></tr>"
                   f"{quotas}</table>") if quotas else ""
    return f"<h2>Composition</h2><table><tr><th>kind / intent</th><th>examples</th></tr>{rows}</table>{quota_table}"


def _expectations_html(d: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(r['table'])}</td><td>{html.escape(r['expectation'])}</td>"
                   f"<td>{html.escape(json.dumps(r['kwargs']))}</td><td>{'✔' if r['success'] else '✘'}</td>"
                   f"<td>{html.escape(json.dumps(r['unexpected_examples']))}</td></tr>" for r in d.get("expectations", []))
    return ("<h2>Great Expectations over the example table</h2><table><tr><th>table</th><th>expectation</th>"
            f"<th>arguments</th><th>met</th><th>examples not met</th></tr>{rows}</table>") if rows else ""


def _image_html(url) -> str:
    """Data-URL images inline; any other URL as text: opening a report must not make the reviewer's browser
    request addresses a data file chose (an internal router's admin page, a tracking pixel)."""
    if isinstance(url, str) and url.startswith("data:image/"):
        return f'<img src="{html.escape(url)}" height="96">'
    return f"<code>[image: {html.escape(str(url)[:200])}]</code>"


def _samples_html(d: dict) -> str:
    blocks = []
    for sample in d.get("samples", []):
        try:
            turns = []
            for m in sample["messages"]:
                parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                body = "".join(_image_html(p["image_url"]["url"]) if p.get("type") == "image_url"
                               else f"<span>{html.escape(str(p.get('text', '')))}</span>" for p in parts)
                turns.append(f'<div class="turn {html.escape(str(m["role"]))}"><b>{html.escape(str(m["role"]))}</b> {body}</div>')
        except (KeyError, TypeError, AttributeError):
            continue  # malformed example: the error table already names its line
        blocks.append(f'<div class="chat"><small>line {sample["line"]}</small>{"".join(turns)}</div>')
    return "<h2>Sample examples</h2>" + "".join(blocks) if blocks else ""


def samples(path: Path, n: int = 4) -> list[dict]:
    """The first ``n`` readable examples, for people to read (rendered with their images in report.html);
    URL query strings (signatures) are redacted."""
    out = []
    for number, raw in iter_lines(path):
        if len(out) == n:
            break
        try:
            obj = parse_line(raw)
        except ValueError:
            continue  # the validator reports these lines; samples show readable examples only
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if (isinstance(messages, list) and structure_problem(obj, raw) is None
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            out.append({"line": number, "messages": _redacted(messages)})
    return out


def _redacted(value):
    """A copy of a (shallow: structure_problem-checked) JSON value with every URL's query string redacted."""
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact_urls(value) if isinstance(value, str) and "://" in value else value


def _banner(d: dict) -> str:
    """Examples, errors, warnings and the duplicate rate: the line a reviewer reads first."""
    s = d["summary"]
    limit = s.get("max_duplicate_fraction")
    return (f"{s['examples']} examples, {s['error_count']} errors, {s['warning_count']} warnings, "
            f"{s.get('duplicate_examples', 0)} duplicates ({s.get('duplicate_fraction', 0.0):.1%}"
            + (f"; at most {limit:.1%} allowed" if limit is not None else "") + ")")


def report_html(d: dict, markdown: str) -> str:
    rows = "".join(f"<tr><td>{f['line']}</td><td><code>{html.escape(f['code'])}</code></td><td>{html.escape(f['message'])}</td></tr>"
                   for f in d["errors"][:500])
    warn = "".join(f"<tr><td>{f['line']}</td><td><code>{html.escape(f['code'])}</code></td><td>{html.escape(f['message'])}</td></tr>"
                   for f in d["warnings"][:500])
    s = d["summary"]
    verdict = "PASS" if d["ok"] else "FAIL"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'"><title>JSONL report {html.escape(d['file'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px}}
.PASS{{color:#2a2}} .FAIL{{color:#c22}} .chat{{border:1px solid #ddd;margin:8px 0;padding:6px;max-width:60em}}
.turn{{margin:4px 0}} .assistant{{background:#eef}} .turn img{{margin:0 4px;vertical-align:middle}}</style></head><body>
<h1>JSONL validation: <code>{html.escape(d['file'])}</code></h1>
<p class="{verdict}"><b>{verdict}</b>: {html.escape(_banner(d))} (model {html.escape(d['model'])})</p>
{_capped_html(d)}
<p>Cost estimate: {s['cost']['trained_tokens']:,} trained tokens ({s['cost']['billed_tokens_per_epoch']:,} × {s['cost']['epochs']} epochs)
≈ <b>${s['cost']['cost_usd']}</b> at ${s['cost']['price_per_million']}/1M.</p>
<h2>Distributions</h2><ul><li>messages per example: {s['messages_per_example']}</li>
<li>images per example: {s['images_per_example']}</li><li>tokens per example: {s['tokens']}</li></ul>
{_composition_html(d)}{_expectations_html(d)}{_samples_html(d)}
<h2>Errors ({s['error_count']})</h2><table><tr><th>line</th><th>code</th><th>message</th></tr>{rows}</table>
<h2>Warnings ({s['warning_count']})</h2><table><tr><th>line</th><th>code</th><th>message</th></tr>{warn}</table>
</body></html>
"""


def _capped_html(d: dict) -> str:
    note = (d.get("composition") or {}).get("note")
    return f"<p><b>Capped:</b> {html.escape(note)}</p>" if note else ""


def write_reports(d: dict, report_dir: Path) -> None:
    """report.json / .md / .html; text from the file (names, model, messages) is written escaped, never
    failing on a character UTF-8 cannot hold (lone surrogates)."""
    markdown = report_markdown(d)
    disk.write_json(report_dir / "report.json", d)  # json.dumps escapes what is not ASCII
    disk.write_text(report_dir / "report.md", _encodable(markdown))
    disk.write_text(report_dir / "report.html", _encodable(report_html(d, markdown)))


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def composition(examples: list[Example], quotas: dict[str, float] | None, requested: int | None = None,
                capacity: dict[str, int] | None = None) -> dict:
    """Kinds, intents and quotas of a generated set; with ``requested`` (the limit) and ``capacity``
    (:func:`touchvl.chat.generate.distinct_combinations`) also whether -- and why -- it holds fewer examples."""
    kinds = Counter(e.kind for e in examples)
    out = {"examples": len(examples), "kinds": dict(kinds), "intents": dict(Counter(e.intent for e in examples))}
    if requested is not None:
        out |= {"requested": requested, "capped": len(examples) < requested, "capacity": capacity or {}}
        if out["capped"]:
            used = ", ".join(f"{k} {kinds.get(k, 0)} of {n}" for k, n in (capacity or {}).items() if k in kinds)
            out["note"] = (f"{len(examples):,} examples, not the {requested:,} asked for: each (item, kind, intent) "
                           f"combination is used at most once and the distinct combinations ran out ({used})")
    if quotas:
        expected = quota_counts(len(examples), quotas)
        out["quotas"] = {k: {"share": quotas[k], "expected": expected[k], "actual": kinds.get(k, 0),
                             "exact": expected[k] == kinds.get(k, 0)} for k in quotas}
    return out


def example_tables(name: str, examples: list[Example], quotas: dict[str, float] | None) -> list:
    """GX suite over the example table: answers present, image counts per kind, quota shares."""
    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
    n_images = {"text_only": 0, "tactile_only": 1, "dual_image": 2}
    frame = pd.DataFrame({
        "row": range(1, len(examples) + 1), "kind": [e.kind for e in examples],
        "answer_words": [len(e.messages[-1]["content"].split()) for e in examples],
        "images_ok": [sum(isinstance(p, dict) and p.get("type") == "image_url" for p in
                          (e.messages[1]["content"] if isinstance(e.messages[1]["content"], list) else []))
                      == n_images[e.kind] for e in examples]})
    expectations = [gxe.ExpectTableRowCountToBeBetween(min_value=1, severity="critical"),
              gxe.ExpectColumnValuesToBeBetween(column="answer_words", min_value=3, severity="critical"),
              gxe.ExpectColumnValuesToBeInSet(column="images_ok", value_set=[True], severity="critical")]
    tables = [checks.Table(name, frame, expectations, id_column="row")]
    if quotas:
        shares = frame["kind"].value_counts(normalize=True)
        quota_frame = pd.DataFrame([{"kind": k, "error": abs(shares.get(k, 0.0) - v)} for k, v in quotas.items()])
        tolerance = 1.0 / len(examples) + 1e-9  # exact up to rounding: at most one example off per kind
        tables.append(checks.Table(f"{name}_quotas", quota_frame, [
            gxe.ExpectColumnValuesToBeBetween(column="error", max_value=tolerance, severity="critical")], id_column="kind"))
    return tables


def report_dict(report: Report, cost: dict) -> dict:
    s = report.summary
    return {"file": report.path, "model": report.model, "target": report.target, "ok": report.ok,
            "errors": [asdict(f) for f in report.errors], "warnings": [asdict(f) for f in report.warnings],
            "summary": {"examples": s.examples, "valid_examples": s.valid_examples,
                        "error_count": len(report.errors), "warning_count": len(report.warnings),
                        "errors_by_code": dict(Counter(f.code for f in report.errors)),
                        "warnings_by_code": dict(Counter(f.code for f in report.warnings)),
                        "messages_per_example": dict(sorted(s.messages.items())),
                        "images_per_example": dict(sorted(s.images.items())),
                        "images_total": sum(k * v for k, v in s.images.items()),
                        "tokens": s.token_stats(), "image_tokens": s.image_tokens,
                        "text_tokens_exact": s.text_tokens_exact, "text_tokens_source": s.text_tokens_source,
                        "duplicate_examples": s.duplicates, "duplicate_fraction": round(s.duplicate_fraction, 6),
                        "max_duplicate_fraction": s.max_duplicate_fraction,
                        "cost": cost}}


def report_markdown(d: dict) -> str:
    s = d["summary"]
    verdict = "PASS (no errors)" if d["ok"] else f"FAIL ({s['error_count']} errors)"
    note = (d.get("composition") or {}).get("note")
    lines = [f"# JSONL validation: `{printable(d['file'])}`", "", f"**{verdict}** — {_banner(d)}, "
             f"model `{printable(d['model'])}`", "", *([f"**Capped:** {note}", ""] if note else []),
             f"Cost estimate: {s['cost']['trained_tokens']:,} trained tokens ({s['cost']['billed_tokens_per_epoch']:,} "
             f"× {s['cost']['epochs']} epochs) ≈ **${s['cost']['cost_usd']}** at ${s['cost']['price_per_million']}/1M"
             + f" (text tokens: {s['text_tokens_source']})", ""]
    for title, rows in (("Errors", d["errors"]), ("Warnings", d["warnings"])):
        lines += [f"## {title} ({len(rows)})", ""]
        if rows:
            lines += ["| line | code | message |", "|---|---|---|"]
            lines += [f"| {r['line']} | `{r['code']}` | {r['message'].replace('|', '/')} |" for r in rows[:500]]
        lines.append("")
    lines += ["## Distributions", "", f"- messages per example: {s['messages_per_example']}",
              f"- images per example: {s['images_per_example']}", f"- tokens per example: {s['tokens']}", ""]
    if d.get("expectations"):
        lines += ["## Great Expectations over the example table", "", "| table | expectation | met |", "|---|---|---|"]
        lines += [f"| {r['table']} | {r['expectation']} | {'yes' if r['success'] else 'NO'} |" for r in d["expectations"]]
        lines.append("")
    comp = d.get("composition")
    if comp:
        lines += ["## Composition", "", f"- kinds: {comp['kinds']}", f"- intents: {comp['intents']}", ""]
        if comp.get("quotas"):
            lines += ["| kind | share | expected | actual | exact |", "|---|---|---|---|---|"]
            lines += [f"| {k} | {q['share']:.0%} | {q['expected']} | {q['actual']} | {'yes' if q['exact'] else 'NO'} |"
                      for k, q in comp["quotas"].items()]
            lines.append("")
    return "\n".join(lines)
