"""`touchvl finetune export`: sharegpt / trl / axolotl files that read back to the same chats and images."""
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from touchvl.chat.export import FORMATS, export_dataset, read_export
from touchvl.errors import StageError
from touchvl.finetune import contract, providers
from touchvl.params import parse_params

ROOT = Path(__file__).resolve().parents[1]


def encoded(fmt: str, color) -> tuple[str, bytes]:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format=fmt)
    data = buf.getvalue()
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}", data


TAC, TAC_BYTES = encoded("JPEG", (200, 30, 30))
RGB, RGB_BYTES = encoded("PNG", (30, 200, 30))
WEBP, WEBP_BYTES = encoded("WEBP", (30, 30, 200))


def examples(split: str) -> list[dict]:
    system = {"role": "system", "content": "You describe how things feel."}
    img = lambda url: {"type": "image_url", "image_url": {"url": url, "detail": "low"}}
    return [
        {"messages": [system, {"role": "user", "content": [{"type": "text", "text": f"{split}: how does it feel?"}, img(TAC)]},
                      {"role": "assistant", "content": "Smooth and hard, like glass."}]},
        {"messages": [system, {"role": "user", "content": [{"type": "text", "text": "Compare touch and sight."}, img(TAC), img(RGB)]},
                      {"role": "assistant", "content": [{"type": "text", "text": "It looks glossy and feels slick."}]}]},
        {"messages": [system, {"role": "user", "content": "Which feels rougher, sandpaper or silk?"},
                      {"role": "assistant", "content": "Sandpaper feels far rougher."}]},
        {"messages": [{"role": "user", "content": [img(WEBP), {"type": "text", "text": "Is this soft?\nAnswer briefly."}]},
                      {"role": "assistant", "content": "Yes, soft.", "weight": 1},
                      {"role": "user", "content": "And warm?"}, {"role": "assistant", "content": "It feels cool."}]},
    ]


def expected(obj: dict) -> list:
    """What every format must give back, computed from the raw JSON (independently of tasks/export.py)."""
    out = []
    for m in obj["messages"]:
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        segs = []
        for p in parts:
            if p["type"] == "text":
                segs.append(("text", p["text"]))
            else:
                data = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                segs.append(("image", hashlib.sha256(data).hexdigest()[:24]))
        out.append((m["role"], tuple(segs)))
    return out


@pytest.fixture
def dataset(tmp_path):
    raw = {"jsonl": {"out_dir": str(tmp_path / "jsonl")}, "finetune": {"provider": "compatible", "out_dir": str(tmp_path / "ft")}}
    (tmp_path / "jsonl").mkdir()
    for split in ("train", "val"):
        (tmp_path / f"jsonl/tactile_{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples(split)))
    params = parse_params(raw)
    return tmp_path, raw, params


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_to_the_same_messages_and_images(dataset, fmt):
    tmp_path, raw, params = dataset
    files = contract.dataset_files(params)
    providers.approve(params, files, confirm=lambda: True)
    manifest = providers.export(params, files, fmt, tmp_path / "out")
    assert manifest["format"] == fmt and manifest["dataset_sha256"] == files.dataset_sha256()
    assert manifest["images"] == 3 and manifest["splits"]["train"]["examples"] == 4  # each image written once
    originals = {hashlib.sha256(b).hexdigest()[:24]: b for b in (TAC_BYTES, RGB_BYTES, WEBP_BYTES)}
    for split in ("train", "val"):
        back = read_export(tmp_path / "out", split)
        assert [list(chat.turns) for chat, _ in back] == [expected(e) for e in examples(split)]
        for chat, images in back:
            assert {k: originals[k] for k in chat.image_keys} == {k: images[k] for k in chat.image_keys}  # byte-identical
    names = sorted(p.name for p in (tmp_path / "out/images").iterdir())
    assert [n.rsplit(".", 1)[1] for n in names] and {n.rsplit(".", 1)[1] for n in names} == {"jpg", "png", "webp"}


def test_format_specific_shapes(dataset):
    tmp_path, raw, params = dataset
    files = contract.dataset_files(params)
    providers.approve(params, files, confirm=lambda: True)
    providers.export(params, files, "sharegpt", tmp_path / "sg")
    record = json.loads((tmp_path / "sg/tactile_train.jsonl").read_text().splitlines()[1])
    assert [t["from"] for t in record["conversations"]] == ["system", "human", "gpt"]
    assert record["conversations"][1]["value"] == "Compare touch and sight.<image><image>" and len(record["images"]) == 2
    info = json.loads((tmp_path / "sg/dataset_info.json").read_text())
    assert info["touch_train"]["file_name"] == "tactile_train.jsonl" and info["touch_train"]["formatting"] == "sharegpt"
    assert all((tmp_path / "sg" / p).is_file() for p in record["images"])  # relative to the dataset folder
    providers.export(params, files, "trl", tmp_path / "trl")
    record = json.loads((tmp_path / "trl/tactile_train.jsonl").read_text().splitlines()[1])
    assert record["messages"][1]["content"] == [{"type": "text", "text": "Compare touch and sight."}, {"type": "image"}, {"type": "image"}]
    providers.export(params, files, "axolotl", tmp_path / "ax")
    record = json.loads((tmp_path / "ax/tactile_train.jsonl").read_text().splitlines()[0])
    assert record["messages"][1]["content"][1]["type"] == "image" and record["messages"][1]["content"][1]["path"].startswith("images/")
    config = yaml.safe_load((tmp_path / "ax/axolotl.yaml").read_text())
    assert config["datasets"][0] == {"path": "tactile_train.jsonl", "ds_type": "json", "type": "chat_template",
                                     "field_messages": "messages"} and config["sample_packing"] is False


def test_unapproved_changed_or_unexportable_data_is_refused(dataset):
    tmp_path, raw, params = dataset
    files = contract.dataset_files(params)
    with pytest.raises(StageError, match="is not approved"):
        providers.export(params, files, "trl", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    weighted = {"messages": [{"role": "user", "content": "Rough?"}, {"role": "assistant", "content": "No, smooth.", "weight": 0}]}
    (tmp_path / "w.jsonl").write_text(json.dumps(weighted) + "\n")
    with pytest.raises(StageError, match=r"w\.jsonl:1: messages\[1\]: weight 0"):
        export_dataset({"train": tmp_path / "w.jsonl"}, "trl", tmp_path / "w", {})
    token = {"messages": [{"role": "user", "content": "What is <image>?"}, {"role": "assistant", "content": "A tag."}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(token) + "\n")
    with pytest.raises(StageError, match="LLaMA-Factory's image placeholder"):
        export_dataset({"train": tmp_path / "t.jsonl"}, "sharegpt", tmp_path / "t", {})
    assert export_dataset({"train": tmp_path / "t.jsonl"}, "trl", tmp_path / "t", {})["splits"]["train"]["examples"] == 1
    remote = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://host.example/a.jpg"}}]},
                           {"role": "assistant", "content": "Hard."}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(remote) + "\n")
    with pytest.raises(StageError, match="r.jsonl:1: messages\\[0\\].content\\[0\\]: cannot read image: remote image URL; pass --fetch-images"):
        export_dataset({"train": tmp_path / "r.jsonl"}, "axolotl", tmp_path / "r", {})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(StageError, match="not an earlier export"):
        export_dataset({"train": tmp_path / "t.jsonl"}, "trl", tmp_path / "mine", {})
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"
    providers.approve(params, files, confirm=lambda: True)
    with open(files.train, "a") as fh:  # changed after approval
        fh.write(json.dumps(examples("x")[0]) + "\n")
    with pytest.raises(StageError, match="is not approved"):
        providers.export(params, contract.dataset_files(params), "trl", tmp_path / "out")


def test_cli_export_and_rerun_replaces_its_own_export(dataset):
    tmp_path, raw, params = dataset
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "tasks.finetune", *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=120)
    refused = run("export", "--format", "sharegpt", "--out", "exp")
    assert refused.returncode != 0 and "is not approved" in refused.stderr and "Traceback" not in refused.stderr
    assert run("approve", "--yes").returncode == 0
    first = run("export", "--format", "sharegpt", "--out", "exp")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["splits"]["val"]["examples"] == 4
    again = run("export", "--format", "axolotl", "--out", "exp")  # an earlier export is replaced whole
    assert again.returncode == 0 and json.loads((tmp_path / "exp/export.json").read_text())["format"] == "axolotl"
    assert not (tmp_path / "exp/dataset_info.json").exists()


def test_trl_records_render_through_a_real_processor_chat_template(dataset, tmp_path_factory):
    """The TRL records are what a transformers processor consumes: the chat template places one image token
    run per {"type": "image"} and the processor takes the images loaded from the exported paths."""
    from transformers import AutoProcessor

    from touchvl.finetune.local.tiny import build_tiny_vlm

    tmp_path, raw, params = dataset
    files = contract.dataset_files(params)
    providers.approve(params, files, confirm=lambda: True)
    providers.export(params, files, "trl", tmp_path / "trl")
    processor = AutoProcessor.from_pretrained(build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "m", ["It feels smooth."]))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    per_image = (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2  # LLaVA: one token per patch
    for line in (tmp_path / "trl/tactile_train.jsonl").read_text().splitlines():
        record = json.loads(line)
        text = processor.apply_chat_template(record["messages"], tokenize=False)
        images = [Image.open(tmp_path / "trl" / p).convert("RGB") for p in record["images"]]
        batch = processor(text=[text], images=images or None, return_tensors="pt")
        assert text.count("<image>") == len(record["images"])
        assert int((batch["input_ids"] == image_id).sum()) == len(images) * per_image
