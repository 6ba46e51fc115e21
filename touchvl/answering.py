"""Who answers a TouchQA question: a chat model behind the ``openai`` client, or the offline retrieval answerer.

:func:`resolve_backend` turns ``chat.provider`` / ``chat.model`` (or ``qa ask``'s flags) into a
:class:`Backend`. ``auto`` uses ``finetune.provider`` when it can answer here -- its API key is set, or for
``local`` a locally fine-tuned model exists -- and otherwise the offline answerer, with the reason, so the chat
page and ``qa ask`` work on a fresh clone with no key and no network. A provider named explicitly never falls
back: its errors (no key, unreachable server, unknown model) are shown as they are.

The offline answerer (:func:`offline_answer`) composes a reply from the retrieved neighbours' captions
(adjectives weighted by cosine) and :func:`keyword_intent` classifies the question without a model. Both are
labelled wherever they are shown (:data:`OFFLINE_LABEL`).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:  # imported where a client is made or its errors are caught: an offline answer, a plan
    import openai  # or a search never pays the SDK's import (~1.2 s a process)

from touchvl.errors import StageError
from touchvl.finetune.remote import KEY_VARS, api_errors, make_client
from touchvl.params import FinetuneParams, Params
from touchvl.retrieval.index import Hit

OFFLINE = "offline"
PROVIDERS = ("openai", "azure", "compatible", "local", "together")
OFFLINE_LABEL = "offline retrieval answerer: composed from the retrieved neighbours' captions, not by a chat model"

# tactile vocabulary of TVL/SSVTP-style captions, by the property it describes
HARDNESS = ("hard", "firm", "rigid", "solid", "soft", "squishy", "spongy", "cushioned", "plush", "yielding")
ROUGHNESS = ("rough", "coarse", "bumpy", "grainy", "gritty", "grooved", "ridged", "textured", "fine", "smooth",
             "sleek", "polished", "silky", "slippery")
INTENT_KEYWORDS = (  # first match wins: a material or comparison question may also say "feel"
    # stems: a keyword matches every word it begins (compar- -> compared, comparison; differ- -> differences).
    # Checked against the 138 real TouchQA questions of ../shared/real-ssvtp (touchvl evaluate-real).
    ("compare", ("compar", "photo", "picture", "look", "see", "seen", "appearance", "visual", "differ",
                 "distinguish", "relative to", "versus", "vs", "unlike", "similar")),
    ("identify_material", ("material", "made of", "made from", "what is it", "what is this", "what object",
                           "identif", "composition", "substance", "infer", "deduc", "what kind of", "what type of")),
    ("property", ("hard", "soft", "rough", "smooth", "firm", "texture", "squish", "bump", "slipper", "gloss",
                  "matte", "stiff", "elastic", "compliant")),
    ("describe", ("feel", "describe", "touch", "like", "sensation", "tactile", "characteristic", "feature")),
)


@dataclass(frozen=True)
class Backend:
    """The answerer of one session: ``provider`` is a finetune provider or ``offline``."""

    provider: str
    model: str | None
    finetune: FinetuneParams  # client settings, with ``provider`` set
    reason: str = ""  # offline: why no chat model answers

    @property
    def offline(self) -> bool:
        return self.provider == OFFLINE

    def client(self) -> openai.OpenAI:
        return make_client(self.finetune)  # fails naming the missing key variable or setting

    @property
    def label(self) -> str:
        if self.offline:
            return f"{OFFLINE_LABEL} ({self.reason})" if self.reason else OFFLINE_LABEL
        return f"{self.model} via {self.provider}"


def local_model(p: FinetuneParams) -> dict | None:
    """model.json of a locally fine-tuned (servable) model, or None."""
    info = _model_json(p)
    return info if info.get("provider") == "local" and info.get("model_dir") else None


def _model_json(p: FinetuneParams) -> dict:
    path = p.out_dir / "model.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise StageError(f"{path}: not valid JSON") from None


def fine_tuned_model(p: FinetuneParams, provider: str) -> str | None:
    """model.json's model when it was trained with ``provider`` (files without a provider predate the field)."""
    info = _model_json(p)
    if info.get("fine_tuned_model") and info.get("provider", provider) == provider:
        return info["fine_tuned_model"]
    return None


def unusable_reason(p: FinetuneParams) -> str | None:
    """Why ``p.provider`` cannot answer on this machine (no key, endpoint or local model); None when it can."""
    if p.provider == "local":
        return None if local_model(p) else f"finetune.provider is local but {p.out_dir / 'model.json'} names no locally fine-tuned model"
    if not os.environ.get(KEY_VARS[p.provider]):
        return f"{KEY_VARS[p.provider]} is not set"
    if p.provider == "azure" and not p.azure_endpoint:
        return "finetune.azure_endpoint is not set"
    if p.provider == "compatible" and not p.base_url:
        return "finetune.base_url is not set"
    return None


def resolve_backend(params: Params, provider: str | None = None, model: str | None = None) -> Backend:
    """``provider``/``model`` override ``chat.provider``/``chat.model`` (the CLI's flags)."""
    choice = provider or params.chat.provider
    ft = params.finetune
    if choice == OFFLINE:
        return Backend(OFFLINE, None, ft, "offline asked for" if provider else "chat.provider: offline")
    if choice == "auto":
        reason = unusable_reason(ft)
        if reason:
            return Backend(OFFLINE, None, ft, reason)
        choice = ft.provider
    elif choice not in PROVIDERS:
        raise StageError(f"unknown provider {choice!r}: one of auto, {OFFLINE}, {', '.join(PROVIDERS)}")
    else:
        ft = ft.model_copy(update={"provider": choice})
    if choice == "local":
        info = local_model(ft)
        if info is None:
            raise StageError(f"provider local: {ft.out_dir / 'model.json'} names no locally fine-tuned model "
                             f"(set finetune.provider: local, approve, then `touchvl finetune submit`)")
        return Backend("local", model or params.chat.model or info["fine_tuned_model"], ft)
    return Backend(choice, model or params.chat.model or fine_tuned_model(ft, choice) or params.qa.base_model, ft)


# ----------------------------------------------------------------------------- chat completions


class _StreamRefused(Exception):
    """The server answered 400 to ``stream=true`` (as our local model server does)."""


class Completion:
    """One chat completion, iterated as text pieces: tokens as they arrive when the server streams, else the
    whole reply once (a server that refuses ``stream=true`` is asked again without; ``refused_stream`` says so).

    Every API failure (status, connection, timeout) becomes one StageError line naming the provider.
    """

    def __init__(self, backend: Backend, client: openai.OpenAI, messages: list[dict], max_tokens: int,
                 temperature: float, stream: bool = True):
        self.backend, self.client, self.stream = backend, client, stream
        self.request = dict(model=backend.model, messages=messages, max_tokens=max_tokens, temperature=temperature)
        self.streamed = self.refused_stream = False

    def __iter__(self) -> Iterator[str]:
        if self.stream:
            try:
                yield from self._streamed()
                return
            except _StreamRefused:
                self.refused_stream = True
        with api_errors(self.backend.provider):
            response = self.client.chat.completions.create(**self.request)
        yield (response.choices[0].message.content or "") if response.choices else ""

    def _streamed(self) -> Iterator[str]:
        import openai

        with api_errors(self.backend.provider):
            try:
                chunks = self.client.chat.completions.create(**self.request, stream=True)
            except openai.BadRequestError as exc:
                if getattr(exc, "param", None) == "stream":
                    raise _StreamRefused from None
                raise
            self.streamed = True
            with chunks:
                for chunk in chunks:
                    for choice in chunk.choices or ():
                        if choice.delta is not None and choice.delta.content:
                            yield choice.delta.content


# ----------------------------------------------------------------------------- offline answerer


def keyword_intent(question: str) -> str:
    """describe / compare / identify_material / property / other, from keywords (no model)."""
    text = " " + re.sub(r"[^a-z ]+", " ", question.lower()) + " "
    for intent, stems in INTENT_KEYWORDS:
        if any(f" {stem}" in text for stem in stems):
            return intent
    return "other"


def adjective_votes(hits: Sequence[Hit]) -> list[tuple[str, float]]:
    """Caption adjectives ranked by the summed cosine of the neighbours that name them."""
    votes: dict[str, float] = defaultdict(float)
    first_seen: dict[str, int] = {}
    for hit in hits:
        # each word once per caption, in the caption's order: a set's order changes with every process's string
        # hashing, and ties are broken by first appearance -- the same answer must come out every time
        for word in dict.fromkeys(w.strip().lower() for w in hit.caption.split(",") if w.strip()):
            votes[word] += max(hit.score, 0.0) + 1e-6  # a word every neighbour names outranks one that few do
            first_seen.setdefault(word, len(first_seen))
    return sorted(votes.items(), key=lambda kv: (-kv[1], first_seen[kv[0]]))


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def offline_answer(question: str, intent: str, hits: Sequence[Hit], text_query: bool = False) -> str:
    """A reply composed from the neighbours' captions; says when nothing similar was found."""
    if not hits:
        return ("No reference surface in the index is similar enough to answer from "
                "(every neighbour scored below index.search.min_cos).")
    ranked = [w for w, _ in adjective_votes(hits)]
    plural = "s" if len(hits) > 1 else ""
    cosines = f"cosine {hits[0].score:.2f}" + (f" to {hits[-1].score:.2f}" if len(hits) > 1 else "")
    basis = (f"the {len(hits)} reference surface{plural} whose captions best match the question ({cosines})"
             if text_query else f"the {len(hits)} most similar reference surface{plural} ({cosines})")
    top = ranked[:5]
    if text_query and intent != "property":
        return f"Surfaces described that way feel {_join(top)}, going by {basis}; their photos are beside this answer."
    if intent == "property":
        hardness = next((w for w in ranked if w in HARDNESS), None)
        roughness = next((w for w in ranked if w in ROUGHNESS), None)
        return (f"hardness: {hardness or 'not named by the references'}; roughness: "
                f"{roughness or 'not named by the references'} -- judging by {basis}, which feel {_join(top)}.")
    if intent == "identify_material":
        return (f"The reference captions describe feel, not materials: by {basis} it is most likely a surface that "
                f"feels {_join(top)}. Compare the reference photos beside this answer.")
    if intent == "compare":
        return (f"By touch it most likely feels {_join(top)} (from {basis}); "
                f"the reference photos beside this answer show how such surfaces look.")
    return f"It most likely feels {_join(top)}, judging by {basis}."
