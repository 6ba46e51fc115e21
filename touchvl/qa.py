"""TouchQA: answer a question about a tactile image with retrieval-augmented prompting.

    touchvl ask data/sample/images_tac/image_42_tac.jpg "What does this feel like?" [--sensor N] [--json]

The query image is embedded and projected exactly as the database was (:class:`QueryEncoder`),
RGB neighbours are retrieved through the guarded retriever (overfetch, ``min_cos``, de-dup), the
question's intent (classified by the chat model) sets how many neighbours to show and how to ask,
and the chat model -- the fine-tuned one from ``artifacts/finetune/model.json`` when present --
answers from the query image, the neighbours' photos and their reference captions.  With a
:class:`~touchvl.answering.Backend` (``touchvl ask`` and the chat page) the provider and model are chosen by
``chat.provider`` / the flags, and the offline retrieval answerer replies when no chat model can.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a client is made or its errors are caught: an offline answer, a plan
    import openai  # or a search never pays the SDK's import (~1.2 s a process)

from touchvl import disk, imagefile
from touchvl.answering import Backend, keyword_intent, offline_answer
from touchvl.chat.messages import file_data_url
from touchvl.finetune.remote import api_errors, make_client
from touchvl.params import Params
from touchvl.retrieval.index import Hit, Retriever, load_index, search_params
from touchvl.retrieval.query import QueryEncoder

INTENTS = ("describe", "compare", "identify_material", "property", "other")
STYLE = {
    "describe": "Describe how the surface feels to the touch in one or two sentences.",
    "compare": "Compare what touch reveals with what the photos show.",
    "identify_material": "Name the most likely material and say which tactile cues point to it.",
    "property": "Judge hardness and roughness explicitly (e.g. 'hardness: firm; roughness: fine').",
    "other": "Answer the question using the tactile evidence.",
}
CLASSIFY_PROMPT = ("Classify the user's question about a touched surface into exactly one label: "
                   + ", ".join(INTENTS) + ". Reply with the label only.")


@dataclass(frozen=True)
class Answer:
    text: str
    intent: str
    model: str | None  # None: the offline retrieval answerer
    evidence: list[Hit]
    provider: str = ""


def chat_model(params: Params) -> str:
    info = disk.read_json(params.finetune.out_dir / "model.json")
    return info["fine_tuned_model"] if info else params.qa.base_model


def build_messages(question: str, intent: str, query_image: str, hits: list[Hit], max_pixels: int) -> list[dict]:
    """The query image as the encoder saw it (:func:`touchvl.imagefile.jpeg_data_url`: a 16-bit or EXIF-rotated
    upload as prepare would publish it), the neighbours' photos as prepare published them."""
    query_url = imagefile.jpeg_data_url(query_image, max_pixels, "prepare.max_image_pixels", f"tactile image {query_image}")
    parts: list[dict] = [
        {"type": "text", "text": f"Question: {question}\nThe first image is a tactile sensor (gel) image of the surface."},
        {"type": "image_url", "image_url": {"url": query_url, "detail": "low"}},
    ]
    for rank, hit in enumerate(hits, start=1):
        parts += [{"type": "text", "text": f"Reference {rank} (similarity {hit.score:.2f}) feels: {hit.caption}"},
                  {"type": "image_url", "image_url": {"url": file_data_url(hit.rgb_path), "detail": "low"}}]
    system = ("You are a tactile perception assistant. Ground your answer in the tactile image and the reference "
              "surfaces with similar touch. " + STYLE[intent])
    return [{"role": "system", "content": system}, {"role": "user", "content": parts}]


class TouchQAModel:
    def __init__(self, params: Params, client: openai.OpenAI | None = None, backend: Backend | None = None):
        """Without ``backend``: finetune.provider's client and :func:`chat_model` (errors if it cannot answer)."""
        self.params = params
        self.encoder = QueryEncoder(params)
        manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
        self.retriever = Retriever(*load_index(params.index.out_dir, "rgb"), manifest)
        self._client = client
        self.backend = backend
        self.model = backend.model if backend else chat_model(params)

    @property
    def offline(self) -> bool:
        return self.backend is not None and self.backend.offline

    @property
    def provider(self) -> str:
        return self.backend.provider if self.backend else self.params.finetune.provider

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:  # fails naming the missing key variable
            self._client = self.backend.client() if self.backend else make_client(self.params.finetune)
        return self._client

    def _chat(self, messages: list[dict], max_tokens: int) -> str:
        with api_errors(self.provider):
            response = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                           temperature=self.params.qa.temperature)
        return (response.choices[0].message.content or "").strip()

    def classify(self, question: str) -> str:
        if self.offline:
            return keyword_intent(question)
        reply = self._chat([{"role": "system", "content": CLASSIFY_PROMPT}, {"role": "user", "content": question}], 5)
        label = reply.lower().strip(" .'\"")
        return label if label in INTENTS else "other"

    def retrieve(self, image: str | Path, sensor_id: int | None, k: int, exclude_source: int | None = None) -> list[Hit]:
        """Top-k RGB neighbours; ``exclude_source`` leaves out the query's own item (for evaluation)."""
        return self._search(self.encoder.tactile(image, sensor_id), k, exclude_source)

    def _search(self, query: tuple, k: int, exclude_source: int | None) -> list[Hit]:
        vector, space = query
        hits = self.retriever.search(vector, space, search_params(self.params.index, k + 1))[0]
        return [h for h in hits if h.source_id != exclude_source][:k]

    def answer(self, tactile_image: str | Path, question: str, sensor_id: int | None = None, k: int | None = None,
               exclude_source: int | None = None) -> Answer:
        query = self.encoder.tactile(tactile_image, sensor_id)  # the image first: a bad one fails before any API call
        intent = self.classify(question)
        hits = self._search(query, k or self.params.qa.k_by_intent.get(intent, 3), exclude_source)
        if self.offline:
            return Answer(offline_answer(question, intent, hits), intent, None, hits, "offline")
        messages = build_messages(question, intent, str(tactile_image), hits, self.params.prepare.max_image_pixels)
        text = self._chat(messages, self.params.qa.max_tokens)
        return Answer(text, intent, self.model, hits, self.provider)


def format_answer(result: Answer, backend: Backend) -> str:
    """The answer, who gave it, and the evidence it rests on."""
    lines = [result.text, "", f"answerer: {backend.label}",
             f"intent: {result.intent}; top-{len(result.evidence)} evidence (cosine, source id, caption, images):"]
    lines += [f"  {rank}. {h.score:.3f}  source {h.source_id} (uid {h.uid})  {h.caption}\n     {h.tac_path}  {h.rgb_path}"
              for rank, h in enumerate(result.evidence, start=1)]
    if not result.evidence:
        lines.append("  (no neighbour above index.search.min_cos)")
    return "\n".join(lines)
