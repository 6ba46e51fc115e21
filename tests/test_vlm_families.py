"""The local LoRA fine-tuner on real VLM families: Qwen2-VL, Qwen2.5-VL, SmolVLM (Idefics3), SmolVLM2, LLaVA-1.5.

Each family is a random-weight model built from its own transformers config/model/processor classes with
its published chat template (tests/vlm_families.py), saved with ``save_pretrained``: our own code --
``Encoder``/``collate``, the trainer's LoRA targets, a whole local job and the model server -- runs on it
as it would on the downloaded checkpoint.
"""
import json
import os
from pathlib import Path

import openai
import pytest
import torch

from tasks import finetune as finetune_stage
from touchvl.finetune import contract, providers
from touchvl.finetune.local.data import IGNORE, TrainingExample, convert_messages
from touchvl.finetune.local.trainer import Events, Layout, LocalTrainer, read_events
from touchvl.finetune.server import ChatModel, ModelServer
from touchvl.params import LocalFinetuneParams, parse_params
from tests.finetune_local_fixtures import SURFACES, data_url, local_raw, one_thread, write_image_dataset  # noqa: F401 (autouse fixture)
from tests.vlm_families import FAMILIES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RED, GREEN, BLUE = (color for color, _ in SURFACES)
ROUGH, SOFT, SMOOTH = (answer for _, answer in SURFACES)
NAMES = list(FAMILIES)



@pytest.fixture(scope="module", params=NAMES)
def family(request, tmp_path_factory):
    """(spec, folder of the saved random-weight model), built once per family."""
    spec = FAMILIES[request.param]
    out = tmp_path_factory.mktemp(spec.name) / "base"
    spec.build(out)
    return spec, out


def _image(color) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(color)}}


def _example(raw: list[dict], where: str = "t:1") -> TrainingExample:
    return TrainingExample(*convert_messages(raw, where), where)


def _trainer(base: Path, root: Path, train: list[TrainingExample], **cfg) -> LocalTrainer:
    settings = dict(device="cpu", lora_r=4, lora_alpha=8, lora_dropout=0.0, max_length=512, batch_size=len(train))
    cfg = LocalFinetuneParams(**{**settings, **cfg})
    lay = Layout(root / "local")
    return LocalTrainer(cfg, 0, str(base), train, train, lay, "local-test", "fp", Events(lay.events, "local-test"))


def _runs(mask: torch.Tensor) -> list[slice]:
    idx = mask.nonzero().flatten().tolist()
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(slice(start, a + 1))
            start = b
    return runs


# a system prompt, an image turn, a text turn whose answer has weight 0, then a turn with two images
CONVERSATION = [
    {"role": "system", "content": "You describe how surfaces feel to the touch."},
    {"role": "user", "content": [{"type": "text", "text": "Tactile sample 1: how does this surface feel?"}, _image(RED)]},
    {"role": "assistant", "content": ROUGH},
    {"role": "user", "content": "And again?"},
    {"role": "assistant", "content": "Still rough.", "weight": 0},
    {"role": "user", "content": [{"type": "text", "text": "Compare the two surfaces."}, _image(GREEN), _image(BLUE)]},
    {"role": "assistant", "content": SOFT},
]
TEXT_ONLY = [{"role": "user", "content": "How does moss feel?"}, {"role": "assistant", "content": SOFT}]
ONE_IMAGE = [{"role": "user", "content": [{"type": "text", "text": "Tactile sample 2: how does this surface feel?"},
                                          _image(BLUE)]}, {"role": "assistant", "content": SMOOTH}]
TWO_IMAGES = [CONVERSATION[0], CONVERSATION[5], CONVERSATION[6]]


def test_labels_are_exactly_the_assistant_tokens_and_end_of_turn(family, tmp_path):
    spec, base = family
    ex = _example(CONVERSATION)
    trainer = _trainer(base, tmp_path, [ex])
    item = trainer.encoder(0, ex)
    ids, labels = item["input_ids"][0], item["labels"][0]
    kept = labels != IGNORE
    assert torch.equal(labels[kept], ids[kept]) and (labels[~kept] == IGNORE).all()
    tok = trainer.processor.tokenizer
    decoded = [tok.decode(ids[run], skip_special_tokens=False) for run in _runs(kept)]
    # the trained answers with the template's end of turn; the weight-0 answer, prompts, images: no loss
    assert decoded == [spec.label_text(ROUGH, False), spec.label_text(SOFT, True)]
    image_id = trainer.encoder.image_token_id
    n_image_tokens = int((ids == image_id).sum())
    assert n_image_tokens > 3 and not kept[ids == image_id].any()  # 3 images, expanded to their real token counts


def test_mixed_batch_collates_and_gives_a_finite_loss(family, tmp_path):
    spec, base = family
    examples = [_example(TEXT_ONLY, "t:1"), _example(ONE_IMAGE, "t:2"), _example(TWO_IMAGES, "t:3")]
    assert [len(ex.images) for ex in examples] == [0, 1, 2]
    trainer = _trainer(base, tmp_path, examples, max_steps=1)
    batch = trainer.batch([0, 1, 2], examples)
    assert batch["input_ids"].shape[0] == 3 and batch["labels"].shape == batch["input_ids"].shape
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE).all()
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(**batch)
        assert torch.isfinite(out.loss) and out.loss > 0
        # padding and image stacking change nothing: each example's logits are those it gets alone
        for i in range(3):
            alone = trainer.batch([i], examples)
            n = alone["input_ids"].shape[1]
            assert torch.allclose(out.logits[i, :n], trainer.model(**alone).logits[0], atol=1e-4), (spec.name, i)
    # transformers.Trainer's own step over the same three (one batch): the loss is the mean over their label
    # tokens, as one forward of the padded batch gives it, and it counts their non-padding tokens
    assert trainer.run(lambda: False) == "succeeded" and trainer.step == 1
    step = next(e["data"] for e in read_events(trainer.lay.events) if "train_loss" in (e.get("data") or {}))
    assert step["train_loss"] == pytest.approx(float(out.loss), rel=1e-4)
    assert step["tokens"] == trainer.trained_tokens == int(batch["attention_mask"].sum())


@pytest.mark.parametrize("targets", ["default", "all-linear"])
def test_lora_targets_are_the_language_models_projections_not_the_vision_tower(family, tmp_path, targets):
    spec, base = family
    cfg = {} if targets == "default" else {"target_modules": "all-linear"}
    trainer = _trainer(base, tmp_path, [_example(ONE_IMAGE)], **cfg)
    lora = [name.removesuffix(".lora_A") for name, _ in trainer.model.named_modules() if name.endswith(".lora_A")]
    assert lora and all(spec.lm_prefix in name for name in lora), lora
    assert not [name for name in lora if any(v in name for v in spec.vision_prefixes)]
    n_layers = trainer.model.get_base_model().config.get_text_config().num_hidden_layers
    projections = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"] * (targets != "default"))
    found = {(name.split(spec.lm_prefix)[1].split(".")[0], name.rsplit(".", 1)[1]) for name in lora}
    assert found == {(str(layer), p) for layer in range(n_layers) for p in projections}
    assert len(lora) == len(found)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_a_short_lora_job_merges_and_the_merged_model_serves_an_image_chat(family, tmp_path):
    spec, base = family
    root = tmp_path
    write_image_dataset(root / "jsonl/tactile_train.jsonl", 4)
    write_image_dataset(root / "jsonl/tactile_val.jsonl", 2, start=100)
    params = parse_params(local_raw(root, str(base), epochs=2, max_steps=3, checkpoint_every=2, batch_size=2))
    providers.approve(params, contract.dataset_files(params), confirm=lambda: True)
    job = finetune_stage.run(params)
    assert job["status"] == "succeeded" and job["step"] == 3
    model = json.loads((root / "ft/model.json").read_text())
    merged = Path(model["model_dir"])
    # the merged folder is a plain model of the family (no adapter left), and LoRA changed its LM weights
    from safetensors.torch import load_file

    before, after = load_file(base / "model.safetensors"), load_file(merged / "model.safetensors")
    assert not [k for k in after if "lora" in k] and set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # (checkpoint key names, which some families save in their legacy layout: Qwen2-VL's "model.layers.N...")
    assert changed and all(k.rsplit(".", 2)[1] in ("q_proj", "k_proj", "v_proj", "o_proj")
                           and not any(v in k for v in spec.vision_prefixes) for k in changed), changed
    name = job["fine_tuned_model"]
    with ModelServer(ChatModel(merged, name, "cpu", default_max_tokens=8)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == [name]
        reply = client.chat.completions.create(model=name, max_tokens=6, temperature=0, messages=[
            {"role": "system", "content": "You describe how surfaces feel to the touch."},
            {"role": "user", "content": [{"type": "text", "text": "Tactile sample 7: how does this surface feel?"},
                                         _image(GREEN)]}])
    assert reply.object == "chat.completion" and reply.model == name
    assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length") and 1 <= reply.usage.completion_tokens <= 6
    processor = server.model.processor
    prompt_only = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                                tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens > len(processor.tokenizer(prompt_only)["input_ids"]) + 3  # the image's tokens count
