import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.encoders import (CLIP_MEAN, CLIP_STD, ENCODER_CONFIGS, EncoderError, EncoderSpec, ImageBindEncoder,
                            fingerprint, imagebind_model_module, preprocess_image, resolve_device, tokenize)


@pytest.fixture(scope="module")
def tiny():
    return ImageBindEncoder(EncoderSpec(device="cpu"))


def test_preprocessing_matches_imagebind_transform():
    img = Image.new("RGB", (300, 200), (51, 102, 204))
    x = preprocess_image(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    for c, v in enumerate((51, 102, 204)):
        assert torch.allclose(x[c], torch.tensor((v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-4)
    assert preprocess_image(Image.new("L", (50, 400), 128)).shape == (3, 224, 224)
    assert preprocess_image(Image.new("RGBA", (224, 224), (1, 2, 3, 0))).shape == (3, 224, 224)


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


def test_only_vision_and_text_towers_are_kept(tiny):
    for attr in ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors"):
        assert set(getattr(tiny.model, attr).keys()) == {"vision", "text"}
    assert 3e6 < sum(p.numel() for p in tiny.model.parameters()) < 4e6


def test_tiny_is_deterministic_batched_equals_single_and_unit_norm(tiny):
    images = torch.stack([preprocess_image(Image.new("RGB", (64, 64), (i * 40, 255 - i * 40, 90))) for i in range(5)])
    batched = tiny.encode_images(images)
    single = torch.cat([tiny.encode_images(images[i:i + 1]) for i in range(5)])
    assert batched.shape == (5, 32) and torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(5), atol=1e-5)
    again = ImageBindEncoder(EncoderSpec(device="cpu")).encode_images(images)
    assert torch.equal(batched, again)
    other = ImageBindEncoder(EncoderSpec(device="cpu", seed=1)).encode_images(images)
    assert not torch.allclose(batched, other)
    texts = tiny.encode_texts(["smooth", "rough, hard"])
    assert texts.shape == (2, 32) and torch.allclose(texts.norm(dim=1), torch.ones(2), atol=1e-5)
    assert tiny.is_smoke and tiny.fingerprint_info()["weights"] == "random-seed-0"


def test_fingerprint_tracks_name_seed_weights_and_preprocessing(tmp_path, tiny):
    base = EncoderSpec()
    assert fingerprint(base) == tiny.fingerprint == ImageBindEncoder(EncoderSpec(device="cpu")).fingerprint
    assert fingerprint(EncoderSpec(seed=1)) != fingerprint(base)
    ckpt = tmp_path / "w.pth"
    torch.save(tiny.model.state_dict(), ckpt)
    with_weights = fingerprint(EncoderSpec(checkpoint=ckpt))
    assert with_weights != fingerprint(base)
    state = tiny.model.state_dict()
    state["modality_heads.vision.2.weight"] = state["modality_heads.vision.2.weight"] + 1
    torch.save(state, ckpt)
    assert fingerprint(EncoderSpec(checkpoint=ckpt)) != with_weights


def test_huge_config_is_metas_and_round_trips_scaled_down(tmp_path):
    module = imagebind_model_module()
    accepted = inspect.signature(module.ImageBindModel.__init__).parameters
    huge = ENCODER_CONFIGS["imagebind_huge"]
    assert set(huge) <= set(accepted)
    source = inspect.getsource(module.imagebind_huge)
    for key, value in huge.items():
        assert re.search(rf"{key}={value}\b", source), key
    # a scaled-down copy with the same keyword set: save, load through the checkpoint path, same vectors
    scaled = (("vision_embed_dim", 64), ("vision_num_blocks", 2), ("vision_num_heads", 2), ("text_embed_dim", 32),
              ("text_num_blocks", 1), ("text_num_heads", 2), ("out_embed_dim", 24))
    spec = EncoderSpec(name="imagebind_huge", checkpoint=None, cache_dir=tmp_path, seed=5, device="cpu",
                       config_overrides=scaled)
    torch.manual_seed(5)
    reference = module.ImageBindModel(**spec.config()).eval()
    torch.save(reference.state_dict(), tmp_path / "imagebind_huge.pth")
    encoder = ImageBindEncoder(spec)  # found in cache_dir
    assert not encoder.is_smoke and encoder.dim == 24
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(reference({"vision": pixels})["vision"], dim=-1)
    assert torch.allclose(encoder.encode_images(pixels), expected, atol=1e-5)


def test_wrong_architecture_fails_with_expected_and_found_shapes(tmp_path, tiny):
    torch.save(tiny.model.state_dict(), tmp_path / "tiny.pth")
    spec = EncoderSpec(checkpoint=tmp_path / "tiny.pth", device="cpu", config_overrides=(("out_embed_dim", 48),))
    with pytest.raises(EncoderError, match=r"expected \(48, 64\), found \(32, 64\)"):
        ImageBindEncoder(spec)


def test_missing_huge_weights_name_the_paths_and_env_var_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGEBIND_CHECKPOINT", raising=False)
    with pytest.raises(EncoderError, match=re.escape(str(tmp_path / "imagebind_huge.pth"))):
        ImageBindEncoder(EncoderSpec(name="imagebind_huge", cache_dir=tmp_path))
    monkeypatch.setenv("IMAGEBIND_CHECKPOINT", str(tmp_path / "elsewhere.pth"))
    with pytest.raises(EncoderError, match="elsewhere.pth") as info:
        ImageBindEncoder(EncoderSpec(name="imagebind_huge", cache_dir=tmp_path))
    assert "tasks.encoders download" in str(info.value)


def test_device_resolution():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            resolve_device("cuda")
