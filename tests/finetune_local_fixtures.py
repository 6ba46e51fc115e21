"""Small chat JSONL files with images, and params for local fine-tuning, for tests/test_finetune_local.py."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

# the answer depends on the image's colour, so the vision path carries signal the model can learn
SURFACES = [((200, 40, 40), "It feels rough and hard, like brick."), ((40, 200, 60), "It feels soft and fuzzy, like moss."),
            ((40, 60, 220), "It feels smooth and cool, like glass.")]


def data_url(color, size=(48, 40), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def example(i: int) -> dict:
    color, answer = SURFACES[i % len(SURFACES)]
    user = [{"type": "text", "text": f"Tactile sample {i}: how does this surface feel?"},
            {"type": "image_url", "image_url": {"url": data_url(color), "detail": "low"}}]
    return {"messages": [{"role": "system", "content": "You describe how surfaces feel to the touch."},
                         {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_image_dataset(path: Path, n: int, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(example(start + i)) + "\n" for i in range(n)))
    return path


def local_raw(root: Path, base_model: str, **local) -> dict:
    """params.yaml content for a local job with every output under ``root``."""
    return {"jsonl": {"out_dir": str(root / "jsonl")},
            "validation": {"reports_dir": str(root / "val"), "build_data_docs": False},
            "finetune": {"provider": "local", "submit": True, "out_dir": str(root / "ft"),
                         "local": {"base_model": base_model, "device": "cpu", "lr": 5e-3, "batch_size": 2,
                                   "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "max_length": 256, **local}}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Imported (autouse) by the local fine-tuning tests. Tiny matrices: one thread is fastest, and two spin-waiting OpenMP threads crawl when the 2 cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
