"""Deterministic offline sample dataset in the SSVTP layout (the pipeline's embedded default).

Each id draws hidden material parameters (pattern, spatial frequency, roughness, hardness, gloss,
colour, orientation) and renders, from the *same* height field:

* the RGB photo: albedo colour x Lambert shading + a gloss-controlled specular highlight;
* the tactile image: a gel-sensor impression -- the surface, magnified 1.6x (the pad sees a patch, the
  photo the object), pressed into an elastomer inside an elliptical contact patch, lit by three coloured
  lights (GelSight style, sensor 0) or a warmer LED ring with vignette and more noise (DIGIT style,
  sensor 1).  As in real frames it is mostly flat gel with the LEDs' colour gradient and low-contrast
  shading where it touches.  Soft materials conform, so their impression is shallower and smoother; the
  object's colour never reaches the tactile image;
* the caption: TVL-style comma-separated tactile adjectives derived from the same parameters.

So tactile image, RGB image and caption share real, learnable signal.  Output::

    data/sample/images_tac/image_{id}_tac.jpg
    data/sample/images_rgb/image_{id}_rgb.jpg
    data/sample/captions.csv   index,caption,sensor
    data/sample/split.csv      index,split
"""
from __future__ import annotations

import colorsys
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from touchvl import disk
from touchvl.params import SampleParams

log = logging.getLogger(__name__)

PATTERNS = ("smooth", "stripes", "dots", "grid", "grain", "weave")


@dataclass(frozen=True)
class Material:
    """Hidden parameters an id is rendered from (never written to the dataset itself)."""

    pattern: str
    frequency: float  # cycles across the image
    roughness: float  # relief amplitude in [0, 1]
    hardness: float  # 0 soft .. 1 hard
    gloss: float  # 0 matte .. 1 glossy
    hue: float
    angle: float  # radians
    sensor: int


@dataclass(frozen=True)
class SampleItem:
    id: int
    material: Material
    tactile: np.ndarray  # HxWx3 uint8
    rgb: np.ndarray  # HxWx3 uint8
    caption: str


def draw_material(rng: np.random.Generator, n_sensors: int) -> Material:
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    roughness = rng.uniform(0.0, 0.12) if pattern == "smooth" else rng.uniform(0.3, 1.0)
    return Material(
        pattern=pattern,
        frequency=float(rng.uniform(2.0, 4.0) if pattern == "smooth" else rng.uniform(3.0, 14.0)),
        roughness=float(roughness),
        hardness=float(rng.uniform(0.0, 1.0)),
        gloss=float(rng.uniform(0.0, 1.0)),
        hue=float(rng.uniform(0.0, 1.0)),
        angle=float(rng.uniform(0.0, np.pi)),
        sensor=int(rng.integers(n_sensors)),
    )


def _gaussian_blur(field: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0:
        return field
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.fftfreq(field.shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    return np.real(np.fft.ifft2(np.fft.fft2(field) * kernel))


def height_field(m: Material, size: int, rng: np.random.Generator) -> np.ndarray:
    """Surface relief in [-1, 1] x roughness on a size x size grid."""
    y, x = np.mgrid[0:size, 0:size] / size
    u = x * np.cos(m.angle) + y * np.sin(m.angle)
    v = -x * np.sin(m.angle) + y * np.cos(m.angle)
    w = 2 * np.pi * m.frequency
    if m.pattern == "smooth":
        h = 0.5 * np.sin(w * u) * np.sin(0.7 * w * v)
    elif m.pattern == "stripes":
        h = np.sin(w * u)
    elif m.pattern == "dots":
        h = np.clip(np.cos(w * u) * np.cos(w * v), 0, None) ** 0.5 * 2 - 1
    elif m.pattern == "grid":
        h = 1 - 2 * np.maximum(np.abs(np.sin(w * u / 2)), np.abs(np.sin(w * v / 2))) ** 8
    elif m.pattern == "grain":
        h = _gaussian_blur(rng.standard_normal((size, size)), size / (4 * m.frequency))
        h = h / (np.abs(h).max() + 1e-8)
    elif m.pattern == "weave":
        h = np.sin(w * u) * np.sign(np.sin(w * v / 2)) * 0.8 + 0.2 * np.sin(w * v)
    else:  # pragma: no cover - PATTERNS is closed
        raise ValueError(m.pattern)
    return h * m.roughness


def _normals(height: np.ndarray, scale: float) -> np.ndarray:
    gy, gx = np.gradient(height * scale)
    n = np.stack([-gx, -gy, np.ones_like(height)], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def render_rgb(m: Material, height: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = height.shape[0]
    n = _normals(height, scale=size / 6)
    light = np.array([-0.4, -0.5, 0.77])
    light /= np.linalg.norm(light)
    lambert = np.clip(n @ light, 0, 1)
    half = light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    specular = m.gloss * np.clip(n @ half, 0, 1) ** (8 + 120 * m.gloss)
    albedo = np.array(colorsys.hsv_to_rgb(m.hue, 0.35 + 0.5 * (1 - m.gloss) * 0.5, 0.75))
    # pattern also shows as a slight tone change, as printed/woven materials do
    tone = 1.0 + 0.15 * height[..., None]
    img = albedo * tone * (0.35 + 0.65 * lambert[..., None]) + specular[..., None] * 0.9
    y = np.linspace(-1, 1, size)[:, None, None]
    img = img * (1.0 - 0.08 * y)  # uneven room light
    img += rng.normal(0, 0.015, img.shape)
    return _to_uint8(img)


SENSOR_STYLES = {
    # Real frames are mostly flat gel: a tinted background with the LEDs' colour gradient across it, and the
    # contact shows as low-contrast shading (a few percent of the range), not as a picture of the object.
    # background colour, light directions (azimuth deg) and colours, shading gain, LED gradient, noise, vignette
    0: dict(background=(0.50, 0.52, 0.56), azimuths=(90, 210, 330), gain=0.30, gradient=0.06, noise=0.010,
            vignette=0.05, colours=((0.9, 0.25, 0.25), (0.25, 0.9, 0.25), (0.25, 0.3, 0.9))),  # GelSight
    1: dict(background=(0.66, 0.60, 0.52), azimuths=(0, 120, 240), gain=0.22, gradient=0.10, noise=0.025,
            vignette=0.22, colours=((0.95, 0.55, 0.35), (0.45, 0.8, 0.5), (0.5, 0.5, 0.95))),  # DIGIT
}
TACTILE_ZOOM = 1.6
"""The gel sees a patch of the surface magnified (a ~2 cm pad filling the frame), the photo the whole object:
the same relief at a different scale, so the relation between the two images is learnable, not an identity."""


def magnified(height: np.ndarray, zoom: float) -> np.ndarray:
    """The centre 1/zoom of ``height`` resampled to its full size (bicubic)."""
    size = height.shape[0]
    side = size / zoom
    lo = (size - side) / 2
    img = Image.fromarray(height.astype(np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=(lo, lo, lo + side, lo + side)), dtype=np.float64)


def render_tactile(m: Material, height: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = height.shape[0]
    style = SENSOR_STYLES[m.sensor]
    y, x = np.mgrid[0:size, 0:size] / size
    cx, cy = 0.5 + rng.uniform(-0.08, 0.08, 2)
    rx, ry = rng.uniform(0.32, 0.45, 2)
    r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    contact = np.clip(1.0 - r2, 0.0, 1.0) ** 0.5  # rounded contact patch
    # soft materials conform: smoother and shallower impression
    relief = _gaussian_blur(magnified(height, TACTILE_ZOOM), sigma_px=0.3 + 2.5 * (1.0 - m.hardness))
    depth = contact * (0.35 + 0.4 * m.hardness) + contact * relief * (0.4 + 0.6 * m.hardness)
    n = _normals(depth, scale=size / 4)
    img = np.broadcast_to(np.array(style["background"]), (size, size, 3)).copy()
    for azimuth, colour in zip(style["azimuths"], style["colours"]):
        a = np.deg2rad(azimuth)
        light = np.array([np.cos(a), np.sin(a), 0.6])
        light /= np.linalg.norm(light)
        shade = n @ light - 0.6 / np.linalg.norm([1, 0.6])  # zero for a flat gel
        # each LED brightens the gel on its own side: the colour gradient of an empty frame
        falloff = style["gradient"] * ((x - 0.5) * np.cos(a) + (y - 0.5) * np.sin(a))
        img += (style["gain"] * shade + falloff)[..., None] * np.array(colour)
    r_centre = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
    img *= (1.0 - style["vignette"] * r_centre**2 * 2)[..., None]
    img += rng.normal(0, style["noise"], img.shape)
    return _to_uint8(img)


def caption_for(m: Material, rng: np.random.Generator) -> str:
    words: list[str] = []
    if m.pattern == "smooth" or m.roughness < 0.15:
        words.append("smooth")
        if m.gloss > 0.6:
            words.append("slippery")
    else:
        texture = {"stripes": "ridged", "dots": "bumpy", "grid": "grooved", "grain": "grainy",
                   "weave": "woven"}[m.pattern]
        words.append(texture)
        coarse = m.roughness * (1.0 if m.frequency > 7 else 0.7)
        words.append("rough" if coarse > 0.55 else "textured")
        if m.frequency > 10:
            words.append("fine")
        elif m.frequency < 5:
            words.append("coarse")
    words.append("hard" if m.hardness > 0.66 else "firm" if m.hardness > 0.33 else "soft")
    if m.hardness < 0.2:
        words.append("squishy")
    words.append("glossy" if m.gloss > 0.6 else "matte" if m.gloss < 0.3 else "satin")
    order = rng.permutation(len(words))
    return ", ".join(words[i] for i in order)


def render_item(item_id: int, size: int, n_sensors: int, seed: int) -> SampleItem:
    # one independent stream per id: any id renders the same whatever n_ids is
    rng = np.random.default_rng([seed, item_id])
    m = draw_material(rng, n_sensors)
    h = height_field(m, size, rng)
    return SampleItem(item_id, m, render_tactile(m, h, rng), render_rgb(m, h, rng), caption_for(m, rng))


def generate(p: SampleParams) -> tuple[list[SampleItem], pd.DataFrame, pd.DataFrame]:
    """Render all ids; returns the items, captions (index,caption,sensor) and split (index,split)."""
    items = [render_item(i, p.image_size, p.n_sensors, p.seed)
             for i in tqdm(range(p.n_ids), desc="render sample", unit="id")]
    captions = pd.DataFrame({"index": [it.id for it in items],
                             "caption": [it.caption for it in items],
                             "sensor": [it.material.sensor for it in items]})
    rng = np.random.default_rng([p.seed, 2**31])
    n_test = max(1, round(p.n_ids * p.test_fraction))
    test_ids = set(rng.choice(p.n_ids, size=n_test, replace=False).tolist())
    split = pd.DataFrame({"index": [it.id for it in items],
                          "split": ["test" if it.id in test_ids else "train" for it in items]})
    return items, captions, split


def write_dataset(items: list[SampleItem], captions: pd.DataFrame, split: pd.DataFrame,
                  out_dir: Path) -> None:
    with disk.replace_dir(out_dir) as staging:
        (staging / "images_tac").mkdir()
        (staging / "images_rgb").mkdir()
        for it in items:
            Image.fromarray(it.tactile).save(staging / "images_tac" / f"image_{it.id}_tac.jpg", quality=92)
            Image.fromarray(it.rgb).save(staging / "images_rgb" / f"image_{it.id}_rgb.jpg", quality=92)
        disk.write_csv(staging / "captions.csv", captions)
        disk.write_csv(staging / "split.csv", split)


def validation_tables(items: list[SampleItem], captions: pd.DataFrame, split: pd.DataFrame, p: SampleParams) -> list:
    """The sample boundary: every id once, both images of the requested size and never constant, a caption,
    a sensor the params allow, and both splits present."""
    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
    critical = dict(severity="critical")
    rows = pd.DataFrame({
        "id": [it.id for it in items],
        "tac_std": [float(it.tactile.std()) for it in items], "rgb_std": [float(it.rgb.std()) for it in items],
        "tac_size_ok": [it.tactile.shape == (p.image_size, p.image_size, 3) for it in items],
        "rgb_size_ok": [it.rgb.shape == (p.image_size, p.image_size, 3) for it in items],
        "caption": captions["caption"].tolist(), "sensor": captions["sensor"].tolist(),
        "split": split["split"].tolist(), "ids_aligned": (captions["index"].to_numpy() == split["index"].to_numpy()).tolist()})
    expectations = [gxe.ExpectTableRowCountToEqual(value=p.n_ids, **critical),
                    gxe.ExpectColumnValuesToBeUnique(column="id", **critical),
                    gxe.ExpectColumnValuesToBeInSet(column="ids_aligned", value_set=[True], **critical),
                    gxe.ExpectColumnValuesToBeInSet(column="tac_size_ok", value_set=[True], **critical),
                    gxe.ExpectColumnValuesToBeInSet(column="rgb_size_ok", value_set=[True], **critical),
                    # a constant image carries no signal: it would train and evaluate on nothing
                    gxe.ExpectColumnValuesToBeBetween(column="tac_std", min_value=1.0, **critical),
                    gxe.ExpectColumnValuesToBeBetween(column="rgb_std", min_value=1.0, **critical),
                    gxe.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1, **critical),
                    gxe.ExpectColumnValuesToBeBetween(column="sensor", min_value=0, max_value=p.n_sensors - 1, **critical),
                    gxe.ExpectColumnDistinctValuesToEqualSet(column="split", value_set=["train", "test"], **critical)]
    return [checks.Table("items", rows, expectations, id_column="id")]
