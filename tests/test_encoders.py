"""ImageBind encoder on Meta's model code: tiny config on CPU, scaled-down huge config for checkpoints."""
import dataclasses
import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from touchvl.devices import resolve_device
from touchvl.errors import StageError
from touchvl.imagebind.encoder import (CHECKPOINT_ENV, CLIP_MEAN, CLIP_STD, ENCODER_CONFIGS, MODULE_DICTS, EncoderError,
                            EncoderSpec, ImageBindEncoder, fingerprint, imagebind_model_module, preprocess_image,
                            resolve_checkpoint, tokenize)

# the huge keyword set with small values: the same code paths as imagebind_huge, built in seconds
SCALED_HUGE = (("vision_embed_dim", 64), ("vision_num_blocks", 2), ("vision_num_heads", 2), ("text_embed_dim", 32),
               ("text_num_blocks", 1), ("text_num_heads", 2), ("out_embed_dim", 24))


@pytest.fixture(scope="module")
def tiny():
    return ImageBindEncoder(EncoderSpec(device="cpu"))


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.model.state_dict(), path)
    return path


def _images(n: int) -> torch.Tensor:
    return torch.stack([preprocess_image(Image.new("RGB", (64, 48), (i * 40, 255 - i * 40, 90))) for i in range(n)])


def test_preprocessing_shapes_and_clip_normalisation():
    img = Image.new("RGB", (300, 200), (51, 102, 204))
    x = preprocess_image(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    for c, v in enumerate((51, 102, 204)):
        assert torch.allclose(x[c], torch.tensor((v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-4)
    assert preprocess_image(Image.new("L", (50, 400), 128)).shape == (3, 224, 224)
    assert preprocess_image(Image.new("RGBA", (224, 224), (1, 2, 3, 0))).shape == (3, 224, 224)


def test_preprocessing_is_imagebinds_transform_bit_for_bit():
    # imagebind.data.load_and_transform_vision_data's transform, as Meta wrote it
    reference = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
    ])
    rng = np.random.default_rng(0)
    # landscape, portrait, odd sizes (rounding of the resize and of the centre crop), already 224 on the short side
    # (Resize returns it as is), square, a 1-px strip upsampled, a large photo
    for h, w in ((300, 411), (411, 300), (225, 301), (224, 500), (500, 224), (224, 224), (97, 97), (1, 640),
                 (1537, 1023)):
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.equal(preprocess_image(noise), reference(noise)), (h, w)
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):  # converted to RGB first, as ImageBind's loader does
        img = Image.fromarray(rng.integers(0, 256, (230, 260, 3), dtype=np.uint8)).convert(mode)
        assert torch.equal(preprocess_image(img), reference(img.convert("RGB"))), mode


def test_preprocessing_resizes_shorter_side_then_centre_crops():
    img = Image.new("RGB", (448, 224), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 112, 224))  # left quarter white: cropped away by the centre crop
    x = preprocess_image(img)
    assert torch.allclose(x[0], torch.tensor(-CLIP_MEAN[0] / CLIP_STD[0]), atol=1e-3)


def test_tokenizer_uses_imagebind_bpe():
    tokens = tokenize(["smooth, glossy, hard", "rough"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, 0] == tokens[1, 0] == 49406  # <|startoftext|>
    assert not torch.equal(tokens[0], tokens[1])
    assert torch.equal(tokenize(["rough"]), tokens[1:])  # a single text keeps its batch axis


def test_only_vision_and_text_towers_are_kept(tiny):
    for attr in MODULE_DICTS:
        assert set(getattr(tiny.model, attr).keys()) == {"vision", "text"}
    assert 3e6 < sum(p.numel() for p in tiny.model.parameters()) < 4e6


def test_tiny_is_deterministic_batched_equals_single_and_unit_norm(tiny):
    images = _images(5)
    batched = tiny.encode_images(images)
    single = torch.cat([tiny.encode_images(images[i:i + 1]) for i in range(5)])
    assert batched.shape == (5, 64) and batched.dtype == torch.float32
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.equal(batched, ImageBindEncoder(EncoderSpec(device="cpu")).encode_images(images))
    assert not torch.allclose(batched, ImageBindEncoder(EncoderSpec(device="cpu", seed=1)).encode_images(images))
    assert tiny.is_smoke and tiny.dim == 64 and tiny.fingerprint_info()["weights"] == "random-seed-0"


def test_tiny_text_embeddings(tiny):
    texts = ["smooth", "rough, hard", "soft fabric"]
    batched = tiny.encode_texts(texts)
    assert batched.shape == (3, 64) and torch.allclose(batched.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(batched, torch.cat([tiny.encode_texts([t]) for t in texts]), atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_fingerprint_tracks_name_config_seed_and_weights(tiny, tiny_checkpoint):
    base = EncoderSpec()
    assert fingerprint(base) == tiny.fingerprint == ImageBindEncoder(EncoderSpec(device="cpu")).fingerprint
    assert fingerprint(EncoderSpec(device="cuda")) == fingerprint(base)  # where it runs is not what it is
    assert fingerprint(EncoderSpec(seed=1)) != fingerprint(base)
    assert fingerprint(EncoderSpec(config_overrides=(("out_embed_dim", 48),))) != fingerprint(base)
    with_weights = fingerprint(EncoderSpec(checkpoint=tiny_checkpoint))
    assert with_weights != fingerprint(base)
    assert fingerprint(EncoderSpec(name="imagebind_huge", checkpoint=tiny_checkpoint)) != with_weights
    state = tiny.model.state_dict()
    state["modality_heads.vision.2.weight"] = state["modality_heads.vision.2.weight"] + 1
    torch.save(state, tiny_checkpoint)
    assert fingerprint(EncoderSpec(checkpoint=tiny_checkpoint)) != with_weights


def test_huge_config_is_metas_and_round_trips_scaled_down(tmp_path):
    module = imagebind_model_module()
    huge = ENCODER_CONFIGS["imagebind_huge"]
    assert set(huge) <= set(inspect.signature(module.ImageBindModel.__init__).parameters)
    source = inspect.getsource(module.imagebind_huge)
    assert len(re.findall(r"\w+=[\d.]+,", source)) == len(huge)
    for key, value in huge.items():
        assert re.search(rf"\b{key}={value},", source), key
    spec = EncoderSpec(name="imagebind_huge", cache_dir=tmp_path, seed=5, device="cpu", config_overrides=SCALED_HUGE)
    torch.manual_seed(5)
    reference = module.ImageBindModel(**spec.config()).eval()
    torch.save({"model": reference.state_dict()}, tmp_path / "imagebind_huge.pth")  # wrapped, as trainers save
    # another seed: the weights must come from the file (found in cache_dir), not from the same init
    encoder = ImageBindEncoder(dataclasses.replace(spec, seed=6))
    assert not encoder.is_smoke and encoder.dim == 24
    pixels, texts = torch.randn(2, 3, 224, 224), ["smooth", "rough"]
    with torch.inference_mode():
        expected = reference({"vision": pixels, "text": tokenize(texts)})
    assert torch.allclose(encoder.encode_images(pixels), expected["vision"], atol=1e-5)
    text_expected = torch.nn.functional.normalize(expected["text"], dim=-1)  # undo the logit scale
    assert torch.allclose(encoder.encode_texts(texts), text_expected, atol=1e-5)


def test_wrong_dimension_fails_with_expected_and_found_shapes(tiny_checkpoint):
    spec = EncoderSpec(checkpoint=tiny_checkpoint, device="cpu", config_overrides=(("out_embed_dim", 48),))
    with pytest.raises(EncoderError, match=r"expected \(48, 64\), found \(64, 64\)"):
        ImageBindEncoder(spec)


def test_missing_or_extra_tensors_fail_naming_them(tmp_path, tiny):
    state = tiny.model.state_dict()
    del state["modality_heads.text.proj.1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(EncoderError, match=r"1 vision/text tensors missing \['modality_heads.text.proj.1.weight'\]"):
        ImageBindEncoder(EncoderSpec(checkpoint=tmp_path / "partial.pth", device="cpu"))
    torch.save(tiny.model.state_dict(), tmp_path / "two_blocks.pth")
    one_block = EncoderSpec(checkpoint=tmp_path / "two_blocks.pth", device="cpu",
                            config_overrides=(("vision_num_blocks", 1),))
    with pytest.raises(EncoderError, match=r"unexpected \['modality_trunks.vision.blocks.1"):
        ImageBindEncoder(one_block)


def test_missing_huge_weights_name_the_path_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    with pytest.raises(EncoderError, match=re.escape(str(tmp_path / "imagebind_huge.pth"))) as info:
        ImageBindEncoder(EncoderSpec(name="imagebind_huge", cache_dir=tmp_path))
    assert f"touchvl download-weights --dest {tmp_path}" in str(info.value) and CHECKPOINT_ENV in str(info.value)
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(EncoderError, match="elsewhere.pth"):
        ImageBindEncoder(EncoderSpec(name="imagebind_huge", cache_dir=tmp_path))


def test_checkpoint_precedence_spec_then_env_then_cache_dir(tmp_path, monkeypatch):
    for name in ("explicit.pth", "env.pth", "imagebind_huge.pth"):
        (tmp_path / name).touch()
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    huge = EncoderSpec(name="imagebind_huge", cache_dir=tmp_path)
    assert resolve_checkpoint(huge) == tmp_path / "imagebind_huge.pth"
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "env.pth"))
    assert resolve_checkpoint(huge) == tmp_path / "env.pth"
    explicit = EncoderSpec(name="imagebind_huge", checkpoint=tmp_path / "explicit.pth", cache_dir=tmp_path)
    assert resolve_checkpoint(explicit) == tmp_path / "explicit.pth"
    assert resolve_checkpoint(EncoderSpec()) is None  # tiny ignores the env var: random weights


def test_device_resolution():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(StageError, match=r"embed.device='tpu' is not a device"):
        resolve_device("tpu", "embed.device")
    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="embed.device='cuda' but CUDA is not available"):
            resolve_device("cuda", "embed.device")


def test_a_query_embeds_without_importing_torchvision_or_timms_package_and_timm_still_imports_after():
    """Meta's model code takes DropPath and trunc_normal_ from timm's own files, not through timm's package (whose
    __init__ imports its model zoo and torchvision's: seconds per process); a later ``import timm`` is the real one."""
    import subprocess
    import sys

    code = """
import sys
from PIL import Image
from touchvl.imagebind.encoder import EncoderSpec, ImageBindEncoder, imagebind_model_module, preprocess_image
enc = ImageBindEncoder(EncoderSpec(device="cpu"))  # random weights from the seed
vector = enc.encode_images(preprocess_image(Image.new("RGB", (300, 200), (9, 99, 199))).unsqueeze(0))
assert vector.shape == (1, 64), vector.shape
assert "torchvision" not in sys.modules and "timm" not in sys.modules, sorted(m for m in sys.modules if "vision" in m or m.startswith("timm"))
import timm, timm.layers
transformer = sys.modules["imagebind.models.transformer"]
assert transformer.DropPath is timm.layers.DropPath and hasattr(timm, "create_model")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
