"""Chat fine-tuning examples from captions and image URLs: the two datasets of the original toolkit.

* ``rgb_tac`` (``rgb_tac_ft_jsonl.py``): tactile + RGB image pairs, a text-only example every
  ``text_only_every`` examples — the large first-stage set.
* ``tactile`` (``tactile_ft_jsonl.py``): tactile-focused, with exact quotas of tactile-only,
  dual-image and text-only examples (largest-remainder rounding) — the second-stage set.

Answers are written from the reference caption per intent (describe the feel, compare touch with
sight, name the material, judge hardness/roughness).  Pure functions: rows in, example dicts out.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

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


def build_example(item: Item, kind: str, intent: str, system: str, mode: str, detail: str) -> Example:
    if kind == "text_only":
        user: str | list = TEXT_QUESTIONS[intent].format(c=item.caption)
    else:
        label = "Tactile sensor image" if kind == "tactile_only" else "Tactile sensor image, then a photo of the same spot"
        user = [{"type": "text", "text": f"{label}. {QUESTIONS[intent]}"}, image_part(item.tac_url, mode, detail)]
        if kind == "dual_image":
            user.append(image_part(item.rgb_url, mode, detail))
    return Example(item.uid, kind, intent, [{"role": "system", "content": system}, {"role": "user", "content": user},
                                            {"role": "assistant", "content": answer(intent, item.caption)}])


def quota_counts(total: int, quotas: dict[str, float]) -> dict[str, int]:
    """Exact counts summing to ``total``: floor of each share, the rest by largest remainder."""
    raw = {k: total * v for k, v in quotas.items()}
    counts = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (raw[k] - counts[k], k), reverse=True)[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _cycle(items: list[Item], n: int, rng: np.random.Generator) -> list[Item]:
    """``n`` items, each used once per pass over a fresh shuffle (more passes when n > len(items))."""
    out: list[Item] = []
    while len(out) < n and items:
        out += [items[i] for i in rng.permutation(len(items))]
    return out[:n]


def multimodal_set(items: list[Item], limit: int, text_only_every: int, intents: tuple[str, ...], seed: int,
                   system: str, mode: str, detail: str) -> list[Example]:
    rng = np.random.default_rng(seed)
    chosen = _cycle(items, min(limit, len(items) * len(intents)), rng)
    examples = []
    for i, item in enumerate(chosen):
        kind = "text_only" if text_only_every and (i + 1) % text_only_every == 0 else "dual_image"
        examples.append(build_example(item, kind, intents[rng.integers(len(intents))], system, mode, detail))
    return examples


def tactile_set(items: list[Item], limit: int, quotas: dict[str, float], intents: tuple[str, ...], seed: int,
                system: str, mode: str, detail: str) -> list[Example]:
    rng = np.random.default_rng(seed + 1)
    total = min(limit, len(items) * len(intents))
    counts = quota_counts(total, quotas)
    kinds = [k for k, n in counts.items() for _ in range(n)]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    chosen = _cycle(items, total, rng)
    return [build_example(item, kind, intents[rng.integers(len(intents))], system, mode, detail)
            for item, kind in zip(chosen, kinds)]


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
    disk.write_text(path, "".join(json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n" for e in examples))
