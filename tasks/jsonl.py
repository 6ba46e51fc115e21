"""``jsonl``: the fine-tuning datasets, and the validator people run on any chat JSONL file.

    python -m tasks.jsonl                       # the DVC stage: both datasets, train + validation, reports
    python -m tasks.jsonl rgb_tac --csv C --image-url-csv M --out F [--limit N] [--image-limit N]
                          [--text-only-every N] [--text-only-pairs N] [--intents a,b] [--seed S]
    python -m tasks.jsonl tactile ...           # same flags, quotas from params
    python -m tasks.jsonl validate FILE [--report-dir DIR] [--check-urls] [--model M] [--epochs N|auto]
                                        [--target openai|together]

``validate`` writes ``report.json``, ``report.md`` and ``report.html``; exit status 0 when there
are no errors (warnings allowed), 1 with errors, 2 on usage errors.
"""
from __future__ import annotations

import argparse
import html
import json
from dataclasses import asdict
import logging
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from tasks import atomic
from tasks.jsonl_targets import TARGETS
from tasks.jsonl_generate import Example, Item, multimodal_set, quota_counts, tactile_set
from tasks.jsonl_validate import cost_estimate, iter_lines, report_dict, report_markdown, validate_file
from tasks.params import Params, load_params
from tasks.stage import StageError, run_main

log = logging.getLogger(__name__)

# $ per 1M training tokens; the original toolkit's reference price is the default row
TRAINING_PRICES = {"gpt-4o-2024-08-06": 25.0, "gpt-4o-mini-2024-07-18": 3.0, "gpt-4.1-2025-04-14": 25.0,
                   "gpt-4.1-mini-2025-04-14": 5.0}


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


def _samples_html(d: dict) -> str:
    blocks = []
    for sample in d.get("samples", []):
        try:
            turns = []
            for m in sample["messages"]:
                parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                body = "".join(f'<img src="{html.escape(p["image_url"]["url"])}" height="96">' if p.get("type") == "image_url"
                               else f"<span>{html.escape(str(p.get('text', '')))}</span>" for p in parts)
                turns.append(f'<div class="turn {html.escape(str(m["role"]))}"><b>{html.escape(str(m["role"]))}</b> {body}</div>')
        except (KeyError, TypeError, AttributeError):
            continue  # malformed example: the error table already names its line
        blocks.append(f'<div class="chat"><small>line {sample["line"]}</small>{"".join(turns)}</div>')
    return "<h2>Sample examples</h2>" + "".join(blocks) if blocks else ""


def samples(path: Path, n: int = 4) -> list[dict]:
    """The first ``n`` examples, for people to read (rendered with their images in report.html)."""
    out = []
    for number, raw in iter_lines(path):
        if len(out) == n:
            break
        try:
            messages = json.loads(raw.decode("utf-8"))["messages"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            continue  # the validator reports these lines; samples show readable examples only
        if isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            out.append({"line": number, "messages": messages})
    return out


def report_html(d: dict, markdown: str) -> str:
    rows = "".join(f"<tr><td>{f['line']}</td><td><code>{html.escape(f['code'])}</code></td><td>{html.escape(f['message'])}</td></tr>"
                   for f in d["errors"][:500])
    warn = "".join(f"<tr><td>{f['line']}</td><td><code>{html.escape(f['code'])}</code></td><td>{html.escape(f['message'])}</td></tr>"
                   for f in d["warnings"][:500])
    s = d["summary"]
    verdict = "PASS" if d["ok"] else "FAIL"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>JSONL report {html.escape(d['file'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px}}
.PASS{{color:#2a2}} .FAIL{{color:#c22}} .chat{{border:1px solid #ddd;margin:8px 0;padding:6px;max-width:60em}}
.turn{{margin:4px 0}} .assistant{{background:#eef}} .turn img{{margin:0 4px;vertical-align:middle}}</style></head><body>
<h1>JSONL validation: <code>{html.escape(d['file'])}</code></h1>
<p class="{verdict}"><b>{verdict}</b>: {s['examples']} examples, {s['error_count']} errors, {s['warning_count']} warnings (model {html.escape(d['model'])})</p>
<p>Cost estimate: {s['cost']['trained_tokens']:,} trained tokens ({s['cost']['billed_tokens_per_epoch']:,} × {s['cost']['epochs']} epochs)
≈ <b>${s['cost']['cost_usd']}</b> at ${s['cost']['price_per_million']}/1M.</p>
<h2>Distributions</h2><ul><li>messages per example: {s['messages_per_example']}</li>
<li>images per example: {s['images_per_example']}</li><li>tokens per example: {s['tokens']}</li></ul>
{_composition_html(d)}{_expectations_html(d)}{_samples_html(d)}
<h2>Errors ({s['error_count']})</h2><table><tr><th>line</th><th>code</th><th>message</th></tr>{rows}</table>
<h2>Warnings ({s['warning_count']})</h2><table><tr><th>line</th><th>code</th><th>message</th></tr>{warn}</table>
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
    ap.add_argument("--model", default=None, help="default gpt-4o-2024-08-06; with --target together finetune.together.model")
    ap.add_argument("--epochs", default="auto", help="n_epochs as sent to the service (default auto)")
    ap.add_argument("--target", choices=TARGETS, default="openai",
                    help="the service's own rules on top of OpenAI's (together: base64 images, MIME types, turn order)")
    args = ap.parse_args(argv)
    if not args.file.is_file():
        ap.error(f"{args.file}: no such file")
    if args.epochs != "auto" and not args.epochs.isdigit():
        ap.error(f"--epochs must be 'auto' or a positive integer, got {args.epochs!r}")
    prices = TRAINING_PRICES
    if args.target == "together":  # Together's table lives in params (the defaults when run outside a project)
        from tasks.params import ParamsError, TogetherFinetuneParams

        try:
            together = load_params().finetune.together if Path("params.yaml").is_file() else TogetherFinetuneParams()
        except ParamsError as exc:
            ap.error(str(exc))
        prices = {m: rates["lora"] for m, rates in together.prices_per_million.items() if "lora" in rates}
        args.model = args.model or together.model
        args.epochs = str(together.n_epochs) if args.epochs == "auto" else args.epochs  # Together has no "auto"
    args.model = args.model or "gpt-4o-2024-08-06"
    report = validate_file(args.file, model=args.model, check_urls=args.check_urls, target=args.target)
    d = report_dict(report, cost_estimate(report.summary, args.model, prices, n_epochs=args.epochs))
    d["samples"] = samples(args.file)
    report_dir = args.report_dir or args.file.with_suffix(".report")
    write_reports(d, report_dir)
    s = d["summary"]
    print(f"{'PASS' if report.ok else 'FAIL'}: {s['examples']} examples, {s['error_count']} errors, "
          f"{s['warning_count']} warnings; est. ${s['cost']['cost_usd']} -> {report_dir}/report.md")
    for f in report.errors[:10]:
        print(f"  line {f.line}: {f.code}: {f.message}")
    return 0 if report.ok else 1


def load_items(captions_csv: Path, mapping_csv: Path, uids=None) -> list[Item]:
    """Join captions (``index,caption`` or the manifest's ``uid,caption``) to ``index,tac_url,rgb_url``."""
    captions = pd.read_csv(captions_csv, keep_default_na=False)
    captions = captions.rename(columns={"uid": "index"}) if "uid" in captions.columns else captions
    mapping = pd.read_csv(mapping_csv, keep_default_na=False)
    joined = captions[["index", "caption"]].merge(mapping, on="index", how="inner", validate="one_to_one")
    missing = set(captions["index"]) - set(joined["index"])
    if missing:
        raise StageError(f"{mapping_csv}: no URLs for {len(missing)} ids in {captions_csv} (e.g. {sorted(missing)[:5]})")
    if uids is not None:
        joined = joined[joined["index"].isin(set(uids))]
    return [Item(int(r.index), str(r.caption), str(r.tac_url), str(r.rgb_url)) for r in joined.itertuples()]


def write_jsonl(path: Path, examples: list[Example]) -> None:
    atomic.write_text(path, "".join(json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n" for e in examples))


def composition(examples: list[Example], quotas: dict[str, float] | None) -> dict:
    kinds = Counter(e.kind for e in examples)
    out = {"examples": len(examples), "kinds": dict(kinds), "intents": dict(Counter(e.intent for e in examples))}
    if quotas:
        expected = quota_counts(len(examples), quotas)
        out["quotas"] = {k: {"share": quotas[k], "expected": expected[k], "actual": kinds.get(k, 0),
                             "exact": expected[k] == kinds.get(k, 0)} for k in quotas}
    return out


def example_tables(name: str, examples: list[Example], quotas: dict[str, float] | None) -> list:
    """GX suite over the example table: answers present, image counts per kind, quota shares."""
    from tasks import validation

    gxe = validation.gxe
    n_images = {"text_only": 0, "tactile_only": 1, "dual_image": 2}
    frame = pd.DataFrame({
        "row": range(1, len(examples) + 1), "kind": [e.kind for e in examples],
        "answer_words": [len(e.messages[-1]["content"].split()) for e in examples],
        "images_ok": [sum(isinstance(p, dict) and p.get("type") == "image_url" for p in
                          (e.messages[1]["content"] if isinstance(e.messages[1]["content"], list) else []))
                      == n_images[e.kind] for e in examples]})
    checks = [gxe.ExpectTableRowCountToBeBetween(min_value=1, severity="critical"),
              gxe.ExpectColumnValuesToBeBetween(column="answer_words", min_value=3, severity="critical"),
              gxe.ExpectColumnValuesToBeInSet(column="images_ok", value_set=[True], severity="critical")]
    tables = [validation.Table(name, frame, checks, id_column="row")]
    if quotas:
        shares = frame["kind"].value_counts(normalize=True)
        quota_frame = pd.DataFrame([{"kind": k, "error": abs(shares.get(k, 0.0) - v)} for k, v in quotas.items()])
        tolerance = 1.0 / len(examples) + 1e-9  # exact up to rounding: at most one example off per kind
        tables.append(validation.Table(f"{name}_quotas", quota_frame, [
            gxe.ExpectColumnValuesToBeBetween(column="error", max_value=tolerance, severity="critical")], id_column="kind"))
    return tables


def run(params: Params) -> dict:
    from tasks import validation

    p = params.jsonl
    manifest = pd.read_csv(params.prepare.out_dir / "manifest.csv", keep_default_na=False)
    splits = {"train": manifest.loc[manifest["split"] == "train", "uid"],
              "val": manifest.loc[(manifest["split"] == "test") & (manifest["copy"] == 0), "uid"]}
    common = dict(intents=p.intents, system=p.system_prompt, mode=p.image_mode, detail=p.detail)
    summary = {}
    tables = []
    reports: dict[str, dict] = {}
    for split, uids in splits.items():
        items = load_items(params.prepare.out_dir / "manifest.csv", params.upload.mapping, uids)
        limit_scale = 1.0 if split == "train" else 0.2  # validation files: a fifth of the training size
        datasets = {
            "rgb_tac": (multimodal_set(items, max(1, int(p.multimodal_limit * limit_scale)), p.text_only_every,
                                       seed=p.seed, **common), None),
            "tactile": (tactile_set(items, max(1, int(p.tactile_limit * limit_scale)), p.tactile_quotas,
                                    seed=p.seed, **common), p.tactile_quotas),
        }
        for name, (examples, quotas) in datasets.items():
            path = p.out_dir / f"{name}_{split}.jsonl"
            write_jsonl(path, examples)
            report = validate_file(path, model=p.model)
            d = report_dict(report, cost_estimate(report.summary, p.model, p.prices_per_million, n_epochs=p.n_epochs))
            d["composition"] = composition(examples, quotas)
            d["samples"] = samples(path)
            reports[f"{name}_{split}"] = d
            tables += example_tables(f"{name}_{split}", examples, quotas)
            summary[f"{name}_{split}"] = {"examples": len(examples), "errors": len(report.errors),
                                          "warnings": len(report.warnings), "cost_usd": d["summary"]["cost"]["cost_usd"]}
    checked = validation.run_validation("jsonl", tables, params.validation)
    for name, d in reports.items():  # the example-table expectations feed each file's review report
        d["expectations"] = [asdict(r) for r in checked.results if r.table in (name, f"{name}_quotas")]
        write_reports(d, p.out_dir / "reports" / name)
    bad = {name: d["errors"] for name, d in reports.items() if d["errors"]}
    if bad:
        name, errors = next(iter(bad.items()))
        raise StageError(f"{name}.jsonl: {len(errors)} validation errors, first: {errors[0]}")
    checked.raise_if_failed()
    atomic.write_json(p.out_dir / "summary.json", summary)
    return summary


def generate_main(kind: str, argv: list[str]) -> int:
    """The original toolkit's generator CLIs (rgb_tac_ft_jsonl.py / tactile_ft_jsonl.py)."""
    params = load_params().jsonl
    ap = argparse.ArgumentParser(prog=f"python -m tasks.jsonl {kind}")
    ap.add_argument("--csv", type=Path, required=True, help="captions: index,caption (or the manifest)")
    ap.add_argument("--image-url-csv", type=Path, required=True, help="index,tac_url,rgb_url")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=params.multimodal_limit if kind == "rgb_tac" else params.tactile_limit)
    ap.add_argument("--image-limit", type=int, default=None, help="at most this many examples carry images")
    ap.add_argument("--text-only-every", type=int, default=params.text_only_every, help="rgb_tac: every Nth example text-only")
    ap.add_argument("--text-only-pairs", type=int, default=None, help="tactile: exact number of text-only examples")
    ap.add_argument("--intents", default=",".join(params.intents))
    ap.add_argument("--seed", type=int, default=params.seed)
    ap.add_argument("--image-mode", choices=("base64", "url"), default=params.image_mode)
    args = ap.parse_args(argv)
    intents = tuple(i.strip() for i in args.intents.split(",") if i.strip())
    unknown = set(intents) - {"describe", "compare", "material", "property"}
    if unknown:
        ap.error(f"unknown intent(s) {sorted(unknown)}; choose from describe, compare, material, property")
    items = load_items(args.csv, args.image_url_csv)
    common = dict(intents=intents, seed=args.seed, system=params.system_prompt, mode=args.image_mode, detail=params.detail)
    if kind == "rgb_tac":
        examples = multimodal_set(items, args.limit, args.text_only_every, **common)
    else:
        quotas = dict(params.tactile_quotas)
        if args.text_only_pairs is not None:  # an exact count of text-only examples, the rest keeps its ratio
            total = min(args.limit, len(items) * len(intents))
            text_share = min(1.0, args.text_only_pairs / max(1, total))
            rest = quotas["tactile_only"] + quotas["dual_image"]
            quotas = {"tactile_only": quotas["tactile_only"] / rest * (1 - text_share),
                      "dual_image": quotas["dual_image"] / rest * (1 - text_share), "text_only": text_share}
        examples = tactile_set(items, args.limit, quotas, **common)
    if args.image_limit is not None:
        with_images = [i for i, e in enumerate(examples) if e.kind != "text_only"]
        drop = set(with_images[args.image_limit:])
        examples = [e for i, e in enumerate(examples) if i not in drop]
    write_jsonl(args.out, examples)
    print(f"wrote {len(examples)} examples {dict(Counter(e.kind for e in examples))} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        run_main("jsonl", lambda: log.info("jsonl: %s", run(load_params())))
        return 0
    if argv[0] == "validate":
        return validate_main(argv[1:])
    if argv[0] in ("rgb_tac", "tactile"):
        return generate_main(argv[0], argv[1:])
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
