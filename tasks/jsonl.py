"""``python -m tasks.jsonl validate FILE [--report-dir DIR] [--check-urls] [--model M] [--epochs N|auto]``

Validates an OpenAI chat fine-tuning JSONL file (images included) and writes ``report.json``,
``report.md`` and ``report.html``.  Exit status: 0 no errors (warnings allowed), 1 errors, 2 usage.
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from tasks import atomic
from tasks.jsonl_validate import cost_estimate, report_dict, report_markdown, validate_file

# $ per 1M training tokens; the original toolkit's reference price is the default row
TRAINING_PRICES = {"gpt-4o-2024-08-06": 25.0, "gpt-4o-mini-2024-07-18": 3.0, "gpt-4.1-2025-04-14": 25.0,
                   "gpt-4.1-mini-2025-04-14": 5.0}


def report_html(d: dict, markdown: str) -> str:
    rows = "".join(f"<tr><td>{f['line']}</td><td><code>{html.escape(f['code'])}</code></td><td>{html.escape(f['message'])}</td></tr>"
                   for f in d["errors"][:500])
    warn = "".join(f"<tr><td>{f['line']}</td><td><code>{html.escape(f['code'])}</code></td><td>{html.escape(f['message'])}</td></tr>"
                   for f in d["warnings"][:500])
    s = d["summary"]
    verdict = "PASS" if d["ok"] else "FAIL"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>JSONL report {html.escape(d['file'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px}}
.PASS{{color:#2a2}} .FAIL{{color:#c22}}</style></head><body>
<h1>JSONL validation: <code>{html.escape(d['file'])}</code></h1>
<p class="{verdict}"><b>{verdict}</b>: {s['examples']} examples, {s['error_count']} errors, {s['warning_count']} warnings (model {html.escape(d['model'])})</p>
<p>Cost estimate: {s['cost']['trained_tokens']:,} trained tokens ({s['cost']['billed_tokens_per_epoch']:,} × {s['cost']['epochs']} epochs)
≈ <b>${s['cost']['cost_usd']}</b> at ${s['cost']['price_per_million']}/1M.</p>
<h2>Errors</h2><table><tr><th>line</th><th>code</th><th>message</th></tr>{rows}</table>
<h2>Warnings</h2><table><tr><th>line</th><th>code</th><th>message</th></tr>{warn}</table>
<h2>Distributions</h2><ul><li>messages per example: {s['messages_per_example']}</li>
<li>images per example: {s['images_per_example']}</li><li>tokens per example: {s['tokens']}</li></ul>
</body></html>
"""


def write_reports(d: dict, report_dir: Path) -> None:
    markdown = report_markdown(d)
    atomic.write_json(report_dir / "report.json", d)
    atomic.write_text(report_dir / "report.md", markdown)
    atomic.write_text(report_dir / "report.html", report_html(d, markdown))


def validate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.jsonl validate", description="Validate a chat fine-tuning JSONL file")
    ap.add_argument("file", type=Path)
    ap.add_argument("--report-dir", type=Path, default=None, help="default: <file without .jsonl>.report/")
    ap.add_argument("--check-urls", action="store_true", help="fetch https image URLs (reachability, size, real token cost)")
    ap.add_argument("--model", default="gpt-4o-2024-08-06")
    ap.add_argument("--epochs", default="auto", help="n_epochs as sent to the service (default auto)")
    args = ap.parse_args(argv)
    if not args.file.is_file():
        ap.error(f"{args.file}: no such file")
    if args.epochs != "auto" and not args.epochs.isdigit():
        ap.error(f"--epochs must be 'auto' or a positive integer, got {args.epochs!r}")
    report = validate_file(args.file, model=args.model, check_urls=args.check_urls)
    d = report_dict(report, cost_estimate(report.summary, args.model, TRAINING_PRICES, n_epochs=args.epochs))
    report_dir = args.report_dir or args.file.with_suffix(".report")
    write_reports(d, report_dir)
    s = d["summary"]
    print(f"{'PASS' if report.ok else 'FAIL'}: {s['examples']} examples, {s['error_count']} errors, "
          f"{s['warning_count']} warnings; est. ${s['cost']['cost_usd']} -> {report_dir}/report.md")
    for f in report.errors[:10]:
        print(f"  line {f.line}: {f.code}: {f.message}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "validate":
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    return validate_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
