"""Chat fine-tuning examples from captions and image URLs: the two datasets of the original toolkit.

* ``rgb_tac`` (``rgb_tac_ft_jsonl.py``): tactile + RGB image pairs, a text-only example every
  ``text_only_every`` examples — the large first-stage set.
* ``tactile`` (``tactile_ft_jsonl.py``): tactile-focused, with exact quotas of tactile-only,
  dual-image and text-only examples (largest-remainder rounding) — the second-stage set.

Answers are written from the reference caption per intent (describe the feel, compare touch with
sight, name the material, judge hardness/roughness).  No set repeats an example: each (item, kind,
intent) combination is used at most once (a text-only one once per distinct caption), so a set is capped
at the distinct combinations (:func:`distinct_combinations`).  Inputs are joined on one key:
:func:`join_manifest` by uid (mapping ``index``), :func:`join_captions` by dataset id (mapping
``source_id``).  Pure functions: rows in, example dicts out.
"""
from __future__ import annotations

import hashlib
import json
import math
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from touchvl import disk
from touchvl.chat.messages import image_part
from touchvl.errors import StageError

HARDNESS = ("hard", "firm", "soft", "squishy")
ROUGHNESS = ("rough", "coarse", "grainy", "bumpy", "ridged", "grooved", "textured", "woven", "smooth", "slippery", "fine")
MATERIAL_HINTS = {"woven": "a woven fabric", "grainy": "a grainy, sandpaper-like surface", "ridged": "a ridged plastic or corduroy",
                  "grooved": "a grooved surface such as a tile or grille", "bumpy": "a bumpy, dotted surface",
                  "smooth": "a smooth material such as glass, polished plastic or metal"}


@dataclass(frozen=True)
class Item:
    uid: int
    caption: str
    tac_url: str
    rgb_url: str
    source_id: int | None = None  # the dataset id whose images these are (the copies of one id share it)


@dataclass(frozen=True)
class Example:
    uid: int
    kind: str  # tactile_only | dual_image | text_only
    intent: str
    messages: list


def adjectives(caption: str) -> list[str]:
    return [w.strip() for w in caption.split(",") if w.strip()]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def answer(intent: str, caption: str) -> str:
    words = adjectives(caption)
    hard = [w for w in words if w in HARDNESS]
    rough = [w for w in words if w in ROUGHNESS]
    if intent == "compare":
        return (f"By touch it is {_join(words)}. The gel impression shows the surface relief that the photo only "
                f"hints at, so the {_join(rough or words[:1])} texture is clearer to the touch than to the eye.")
    if intent == "material":
        hint = next((MATERIAL_HINTS[w] for w in words if w in MATERIAL_HINTS), "a material with this surface")
        return f"It feels {_join(words)}, which suggests {hint}."
    if intent == "property":
        return (f"Hardness: {_join(hard) if hard else 'not clear from the contact'}. "
                f"Roughness: {_join(rough) if rough else 'moderate'}. Overall it feels {_join(words)}.")
    return f"It feels {_join(words)}."


QUESTIONS = {
    "describe": "What does this feel like?",
    "compare": "Compare what you feel with what you see.",
    "material": "What material could this be, judging by how it feels?",
    "property": "How hard and how rough is this surface?",
}
TEXT_QUESTIONS = {
    "describe": "A surface is described as '{c}'. How would it feel under your fingertip?",
    "compare": "Something looks like it could be '{c}'. What would touching it tell you that looking cannot?",
    "material": "A surface feels {c}. What could it be made of?",
    "property": "A surface feels {c}. How hard and how rough is it?",
}


def build_example(item: Item, kind: str, intent: str, system: str, mode: str, detail: str,
                  roots: Sequence[Path] = ()) -> Example:
    if kind == "text_only":
        user: str | list = TEXT_QUESTIONS[intent].format(c=item.caption)
    else:
        label = "Tactile sensor image" if kind == "tactile_only" else "Tactile sensor image, then a photo of the same spot"
        user = [{"type": "text", "text": f"{label}. {QUESTIONS[intent]}"}, image_part(item.tac_url, mode, detail, roots)]
        if kind == "dual_image":
            user.append(image_part(item.rgb_url, mode, detail, roots))
    return Example(item.uid, kind, intent, [{"role": "system", "content": system}, {"role": "user", "content": user},
                                            {"role": "assistant", "content": answer(intent, item.caption)}])


def quota_counts(total: int, quotas: dict[str, float]) -> dict[str, int]:
    """Exact counts summing to ``total``: floor of each share, the rest by largest remainder."""
    raw = {k: total * v for k, v in quotas.items()}
    counts = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (raw[k] - counts[k], k), reverse=True)[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


KINDS = ("tactile_only", "dual_image", "text_only")


def example_key(item: Item, kind: str, intent: str) -> tuple:
    """What an example is made of: two combinations with the same key are the same example (a text-only
    example is only its caption and intent, so the copies of one id -- and ids sharing a caption -- give it once)."""
    if kind == "text_only":
        return kind, intent, item.caption
    if kind == "tactile_only":
        return kind, intent, item.caption, item.tac_url
    return kind, intent, item.caption, item.tac_url, item.rgb_url


def _combinations(items: list[Item], kind: str, intents: tuple[str, ...]) -> list[tuple[Item, str]]:
    """Every distinct (item, intent) example of ``kind`` once (the first item of each :func:`example_key`)."""
    first: dict[tuple, tuple[Item, str]] = {}
    for item in items:
        for intent in intents:
            first.setdefault(example_key(item, kind, intent), (item, intent))
    return list(first.values())


def distinct_combinations(items: list[Item], intents: tuple[str, ...]) -> dict[str, int]:
    """How many different examples of each kind the items give: the most a set can hold of that kind."""
    return {kind: len(_combinations(items, kind, intents)) for kind in KINDS}


def _largest_total(limit: int, counts: Callable[[int], dict[str, int]], capacity: dict[str, int]) -> int:
    """The largest ``n <= limit`` whose per-kind counts fit the capacity (a scan down, not a bisection:
    largest-remainder counts are not monotone in ``n``)."""
    n = min(limit, sum(capacity.values()))
    while n > 0 and any(c > capacity.get(k, 0) for k, c in counts(n).items()):
        n -= 1
    return n


def _fill(kinds: list[str], items: list[Item], intents: tuple[str, ...], rng: np.random.Generator,
          build: Callable[[Item, str, str], Example]) -> list[Example]:
    """One example per slot, drawn without replacement from its kind's distinct combinations (seeded order),
    and never one whose messages repeat an earlier example's (e.g. two URLs of byte-identical files)."""
    pools = {}
    for kind in dict.fromkeys(kinds):
        combos = _combinations(items, kind, intents)
        pools[kind] = iter([combos[i] for i in rng.permutation(len(combos))])
    seen: set[bytes] = set()
    examples = []
    for kind in kinds:
        for item, intent in pools[kind]:
            example = build(item, kind, intent)
            digest = hashlib.blake2b(json.dumps(example.messages, sort_keys=True).encode(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                examples.append(example)
                break
    return examples


def multimodal_set(items: list[Item], limit: int, text_only_every: int, intents: tuple[str, ...], seed: int,
                   system: str, mode: str, detail: str, roots: Sequence[Path] = ()) -> list[Example]:
    """Dual-image examples with every ``text_only_every``-th one text-only, each (item, kind, intent) at most
    once: ``limit`` examples, fewer when the distinct combinations run out (:func:`distinct_combinations`)."""
    rng = np.random.default_rng(seed)
    every = text_only_every

    def counts(n: int) -> dict[str, int]:
        text = n // every if every else 0
        return {"dual_image": n - text, "text_only": text}

    total = _largest_total(limit, counts, distinct_combinations(items, intents))
    kinds = ["text_only" if every and (i + 1) % every == 0 else "dual_image" for i in range(total)]
    return _fill(kinds, items, intents, rng, lambda item, kind, intent: build_example(
        item, kind, intent, system, mode, detail, roots))


def tactile_set(items: list[Item], limit: int, quotas: dict[str, float], intents: tuple[str, ...], seed: int,
                system: str, mode: str, detail: str, roots: Sequence[Path] = (),
                text_only_count: int | None = None) -> list[Example]:
    """Exact quotas of the three kinds -- or exactly ``text_only_count`` text-only examples and the rest in the
    quotas' tactile-only : dual-image ratio -- each (item, kind, intent) at most once; capped like
    :func:`multimodal_set`."""
    rng = np.random.default_rng(seed + 1)
    capacity = distinct_combinations(items, intents)
    if text_only_count is None:
        def counts(n: int) -> dict[str, int]:
            return quota_counts(n, quotas)
    else:
        if text_only_count > capacity["text_only"]:
            raise StageError(f"{text_only_count} text-only examples asked for, but the captions give only "
                             f"{capacity['text_only']} distinct ones (distinct captions x intents)")
        if text_only_count > limit:
            raise StageError(f"{text_only_count} text-only examples do not fit in the limit of {limit} examples")
        image_share = quotas["tactile_only"] + quotas["dual_image"]
        image_quotas = ({k: quotas[k] / image_share for k in ("tactile_only", "dual_image")} if image_share
                        else {"tactile_only": 0.5, "dual_image": 0.5})

        def counts(n: int) -> dict[str, int]:
            return {**quota_counts(max(0, n - text_only_count), image_quotas), "text_only": min(n, text_only_count)}
    total = _largest_total(limit, counts, capacity)
    kinds = [k for k, n in (counts(total) if total else {}).items() for _ in range(n)]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    return _fill(kinds, items, intents, rng, lambda item, kind, intent: build_example(
        item, kind, intent, system, mode, detail, roots))


# ------------------------------------------------------------------------------------------- joining the inputs
MAPPING_COLUMNS = ("index", "tac_url", "rgb_url")


def read_url_mapping(path: Path) -> pd.DataFrame:
    """The upload mapping: ``index`` (= manifest uid), ``tac_url``, ``rgb_url`` and ``source_id`` (the dataset
    id, written by the upload stage; absent from older mappings), ids checked to be unique integers."""
    where = Path(path)
    try:
        frame = pd.read_csv(where, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise StageError(f"{where}: URL mapping not found (run `dvc repro upload`)") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:  # UnicodeDecodeError is a ValueError
        raise StageError(f"{where}: not a readable CSV ({type(exc).__name__}: {str(exc)[:200]})") from None
    missing = [c for c in MAPPING_COLUMNS if c not in frame.columns]
    if missing:
        raise StageError(f"{where}: missing column(s) {missing}; expected index,tac_url,rgb_url[,source_id]")
    for column in ("index", "source_id"):
        if column in frame.columns:
            frame[column] = _int_column(frame[column], where, column)
    repeated = set(frame.loc[frame["index"].duplicated(), "index"])
    if repeated:
        raise StageError(f"{where}: index value(s) repeated: {_some(repeated)}")
    for column in ("tac_url", "rgb_url"):
        frame[column] = [_resolve_reference(url, where.parent) for url in frame[column]]
    return frame


def _resolve_reference(url: str, base: Path) -> str:
    """The local backend writes references relative to the mapping's folder (so the mapping does not depend on
    where the project lives); every reader sees them as absolute ``file://`` URLs."""
    if not url or urllib.parse.urlsplit(url).scheme:
        return url
    return (base / urllib.parse.unquote(url)).resolve().as_uri()


def _int_column(values: pd.Series, where: Path, column: str) -> pd.Series:
    bad = [(line, v) for line, v in enumerate(values, start=2)
           if not (v.strip().isascii() and v.strip().isdigit() and len(v.strip()) <= 18)]
    if bad:
        line, value = bad[0]
        raise StageError(f"{where}:{line}: {column} {value[:40]!r} is not a non-negative integer ({len(bad)} such row(s))")
    return values.str.strip().astype("int64")


def _some(ids, n: int = 10) -> str:
    ids = sorted(ids)
    return f"{ids[:n]}" + (f" and {len(ids) - n} more" if len(ids) > n else "")


def join_manifest(manifest: pd.DataFrame, mapping: pd.DataFrame, where: str = "the URL mapping",
                  subset: bool = False) -> list[Item]:
    """Manifest rows to their URLs by uid (mapping ``index`` = uid): every uid on both sides (``subset``: the
    manifest may be part of the mapping), and -- where the mapping records it -- the same dataset id on both
    (a mapping of another manifest fails here)."""
    repeated = set(manifest.loc[manifest["uid"].duplicated(), "uid"])
    if repeated:
        raise StageError(f"the manifest repeats uid(s) {_some(repeated)}")
    uids, mapped = set(manifest["uid"]), set(mapping["index"])
    if uids - mapped:
        raise StageError(f"{where}: no URLs for manifest uid(s) {_some(uids - mapped)} (rerun `dvc repro upload`)")
    if mapped - uids and not subset:
        raise StageError(f"{where}: uid(s) {_some(mapped - uids)} are not in the manifest: the mapping is of "
                         f"another manifest (rerun `dvc repro upload`)")
    joined = manifest[["uid", "source_id", "caption"]].merge(
        mapping.rename(columns={"index": "uid", "source_id": "mapped_source_id"}), on="uid", how="left",
        validate="one_to_one")
    if "mapped_source_id" in joined.columns:
        wrong = joined.loc[joined["source_id"] != joined["mapped_source_id"], "uid"]
        if len(wrong):
            raise StageError(f"{where}: uid(s) {_some(wrong)} map to the images of other dataset ids than in the "
                             f"manifest: the mapping is of another manifest (rerun `dvc repro upload`)")
    return _with_captions([Item(int(r.uid), str(r.caption), str(r.tac_url), str(r.rgb_url), int(r.source_id))
                           for r in joined.itertuples()], where)


def join_captions(captions: dict[int, str], mapping: pd.DataFrame, where: str = "the URL mapping",
                  subset: bool = False) -> list[Item]:
    """Captions by dataset id (``captions.csv`` ``index``) to every mapped image pair of that id (mapping
    ``source_id``: the original and its augmented copies), one Item per mapping row.  Ids on one side only fail,
    naming them; with ``subset`` the captions may cover part of the mapping (e.g. the train split)."""
    if "source_id" not in mapping.columns:
        raise StageError(f"{where}: no source_id column, so its index (manifest uids) cannot be joined to the "
                         f"dataset ids of a captions file: rerun `dvc repro upload` (it writes source_id), pass the "
                         f"manifest (data/prepared/manifest.csv) as --csv, or, for a mapping whose index is the "
                         f"dataset id, rename that column to source_id")
    ids, mapped = set(captions), set(mapping["source_id"])
    if ids - mapped:
        raise StageError(f"{where}: no images for caption id(s) {_some(ids - mapped)} (quarantined by prepare? "
                         f"pass the manifest data/prepared/manifest.csv as --csv)")
    if mapped - ids and not subset:
        raise StageError(f"{where}: dataset id(s) {_some(mapped - ids)} have images but no caption; pass "
                         f"--captions-subset if the captions cover only part of the mapping on purpose")
    rows = mapping[mapping["source_id"].isin(ids)]
    return _with_captions([Item(int(r.index), captions[int(r.source_id)], str(r.tac_url), str(r.rgb_url),
                                int(r.source_id)) for r in rows.itertuples()], where)


def _with_captions(items: list[Item], where: str) -> list[Item]:
    """Every item has at least one adjective to answer from (an empty caption would give an empty answer)."""
    empty = {item.source_id for item in items if not adjectives(item.caption)}
    if empty:
        raise StageError(f"{where}: empty caption for dataset id(s) {_some(empty)}")
    return items


def data_roots(params) -> tuple[Path, ...]:
    """The folders ``file://`` images may be inlined from: the dataset, the prepared images, the local uploads."""
    return params.data.root, params.prepare.out_dir, params.upload.local_dir


def write_jsonl(path: Path, examples: list[Example]) -> None:
    try:
        disk.write_text(path, "".join(json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n" for e in examples))
    except OSError as exc:
        raise StageError(f"{path}: cannot write ({exc.strerror or exc})") from None
