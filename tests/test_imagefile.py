"""One decode path for every image from outside (touchvl.imagefile): prepare, the query encoder (search, TouchQA,
the chat page), TouchQA's and the chat page's data URLs for the chat model, and the model server all see the same
pixels of a 16-bit or EXIF-rotated file, and the same clear error for a decompression bomb or bytes that are no
image."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from touchvl import imagefile
from touchvl.data.prepare import load_rgb
from touchvl.errors import StageError
from touchvl.params import parse_params
from touchvl.qa import build_messages
from touchvl.retrieval.query import QueryEncoder
from touchvl.ui.service import ChatInputError, check_image, image_data_url
from tests.jsonl_fuzz import bomb_png

RAMP = np.tile(np.linspace(0.0, 1.0, 64), (48, 1))  # 48 rows x 64 columns


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG file whose header claims width x height with a few bytes of pixel data: a bomb's header."""
    path.write_bytes(bomb_png(width, height))
    return path


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    out = {}
    # 16-bit grayscale: a full-range ramp (convert("RGB") would clip it to white)
    Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)).save(out.setdefault("16bit", tmp_path / "deep.png"))
    assert Image.open(out["16bit"]).mode == "I;16"
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 64x40, shown 40x64 with red on top
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:, :32, 0] = 220
    stored[:8, :, 1] = 200
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(out.setdefault("rotated", tmp_path / "rotated.jpg"), exif=exif, quality=95)
    png_header(out.setdefault("bomb", tmp_path / "bomb.png"), 10_000, 10_000)  # 100 Mpx claimed, nothing there
    out["notimage"] = tmp_path / "notes.jpg"
    out["notimage"].write_text("<html>not an image</html>")
    return out


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.float64)


def _url_pixels(url: str) -> np.ndarray:
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        return _pixels(img)


def test_read_rgb_scales_deep_samples_applies_orientation_and_names_the_problem(files):
    deep = _pixels(imagefile.read_rgb(files["16bit"], 10**6))
    assert np.abs(deep.mean(axis=2) - RAMP * 255).max() <= 0.5  # a ramp, not white
    shown = _pixels(imagefile.read_rgb(files["rotated"], 10**6))
    assert shown.shape == (64, 40, 3) and shown[:20, :, 0].mean() > 150 and shown[-20:, :, 0].mean() < 60
    assert np.array_equal(deep, _pixels(load_rgb(files["16bit"], 10**6)))  # prepare's pixels are these
    assert np.array_equal(shown, _pixels(imagefile.read_rgb(files["rotated"].read_bytes(), 10**6)))  # bytes too
    with pytest.raises(imagefile.ImageRejected, match=r"^x: image_too_large: .*100000000 pixels > lim=40000000") as big:
        imagefile.read_rgb(files["bomb"], 40_000_000, "lim", where="x")
    assert big.value.reason == "image_too_large" and isinstance(big.value, StageError)
    with pytest.raises(imagefile.ImageRejected) as bad:
        imagefile.read_rgb(files["notimage"], 10**6)
    assert bad.value.reason == "corrupt_image"
    data = files["rotated"].read_bytes()
    with pytest.raises(imagefile.ImageRejected) as cut:
        imagefile.read_rgb(data[: len(data) // 2], 10**6)  # a valid header, the scan cut short
    assert cut.value.reason == "corrupt_image"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> QueryEncoder:
    tmp = tmp_path_factory.mktemp("query")
    return QueryEncoder(parse_params({"embed": {"random_weights": True},
                                      "projector": {"out_dir": str(tmp / "proj"), "projected_dir": str(tmp / "p")}}))


def test_the_query_encoder_embeds_the_pixels_prepare_would_publish(encoder, files, tmp_path):
    for name in ("16bit", "rotated"):
        reference = tmp_path / f"{name}-as-prepared.png"  # lossless: exactly read_rgb's pixels
        imagefile.read_rgb(files[name], 10**6).save(reference)
        vector, space = encoder.tactile(files[name])
        assert space.space == "raw"
        np.testing.assert_array_equal(vector, encoder.tactile(reference)[0])
    # and not the pixels a plain convert("RGB") of the file gives (white for 16 bit, sideways for EXIF)
    Image.open(files["16bit"]).convert("RGB").save(tmp_path / "naive.png")
    assert not np.allclose(encoder.tactile(files["16bit"])[0], encoder.tactile(tmp_path / "naive.png")[0])
    with pytest.raises(imagefile.ImageRejected, match=r"tactile image .*bomb.png: image_too_large: .*"
                                                      r"> prepare.max_image_pixels=40000000"):
        encoder.tactile(files["bomb"])
    with pytest.raises(StageError, match=r"notes.jpg: corrupt_image"):
        encoder.tactile(files["notimage"])


def test_touchqa_shows_the_chat_model_the_pixels_the_encoder_saw(files, tmp_path):
    for name in ("16bit", "rotated"):
        expected = _pixels(imagefile.read_rgb(files[name], 10**6))
        url = build_messages("feel?", "describe", str(files[name]), [], 40_000_000)[1]["content"][1]["image_url"]["url"]
        got = _url_pixels(url)
        assert got.shape == expected.shape and np.abs(got - expected).mean() < 2, name
    with pytest.raises(imagefile.ImageRejected, match="image_too_large"):
        build_messages("feel?", "describe", str(files["bomb"]), [], 40_000_000)
    # a plain RGB JPEG, as prepare publishes it, is sent as its own bytes
    plain = tmp_path / "plain.jpg"
    Image.fromarray((RAMP[..., None] * [200, 100, 50]).astype(np.uint8)).save(plain)
    url = build_messages("feel?", "describe", str(plain), [], 40_000_000)[1]["content"][1]["image_url"]["url"]
    assert base64.b64decode(url.split(",", 1)[1]) == plain.read_bytes()


def test_the_chat_page_checks_and_sends_the_same_pixels_and_errors(files):
    chat = parse_params({}).chat
    for name in ("16bit", "rotated"):
        assert check_image(files[name], chat) == files[name]
        expected = _pixels(imagefile.read_rgb(files[name], 10**6))
        got = _url_pixels(image_data_url(files[name], chat.max_image_pixels))
        assert got.shape == expected.shape and np.abs(got - expected).mean() < 2, name
    with pytest.raises(ChatInputError, match=r"tactile image bomb.png has too many pixels \(image_too_large: "
                                             r".* > chat.max_image_pixels=25000000 \(from the header, not decoded\)\); upload a smaller"):
        check_image(files["bomb"], chat)
    with pytest.raises(ChatInputError, match=r"RGB photo notes.jpg: not a decodable image \(corrupt_image: "):
        check_image(files["notimage"], chat, "RGB photo")


def test_the_model_servers_request_check_decodes_the_same_pixels(files):
    from touchvl.finetune.server import ApiError, ServerLimits, image_fetcher

    fetch = image_fetcher(ServerLimits())
    for name in ("16bit", "rotated"):
        url = "data:image/png;base64," + base64.b64encode(files[name].read_bytes()).decode()
        np.testing.assert_array_equal(_pixels(fetch(url, "request: messages[0]")),
                                      _pixels(imagefile.read_rgb(files[name], 10**6)))
    with pytest.raises(ApiError) as big:
        fetch("data:image/png;base64," + base64.b64encode(files["bomb"].read_bytes()).decode(), "request: m")
    assert (big.value.status, big.value.code) == (400, "image_too_large")
