"""The prepare step's core: join captions to image pairs by id, quarantine bad inputs, augment, split.

Reads a dataset folder in SSVTP layout (``data.root``)::

    images_tac/image_{id}_tac.jpg   images_rgb/image_{id}_rgb.jpg
    captions.csv  index,caption[,sensor]      split.csv (optional)  index,split

Writes ``data/prepared/manifest.csv`` (one row per image pair, originals and augmented copies),
augmented/normalised images under ``data/prepared/images_{tac,rgb}/`` and
``artifacts/reports/prepare/quarantine.csv`` (``id,file,reason,detail``, one row per bad id).

Bad inputs are quarantined, never fatal and never able to drop a good row; the stage fails only
when the quarantined fraction exceeds ``prepare.max_bad_fraction``.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, UnidentifiedImageError
from tqdm import tqdm

from touchvl import disk
from touchvl.disk import MANIFEST_COLUMNS
from touchvl.errors import StageError
from touchvl.params import AugmentParams, PrepareParams

log = logging.getLogger(__name__)

REASONS = (
    "bad_encoding", "bad_id", "duplicate_id", "missing_caption", "empty_caption",
    "missing_images", "missing_tac", "missing_rgb", "corrupt_image", "image_too_small",
    "image_too_large",
)
SPLITS = ("train", "test")
UID_STRIDE = 1000  # uid = source_id * UID_STRIDE + copy: stable across reruns and new ids
MAX_SOURCE_ID = (2**63 - 1) // UID_STRIDE - 1
IMAGE_NAME = re.compile(r"^image_(?P<id>.+)_(?P<kind>tac|rgb)\.(?:jpe?g|png)$", re.IGNORECASE)


@dataclass(frozen=True)
class Quarantined:
    id: str
    file: str
    reason: str
    detail: str


@dataclass(frozen=True)
class SourcePair:
    """A good (id, tactile, rgb, caption) row of the input dataset."""

    id: int
    tac_path: Path
    rgb_path: Path
    caption: str
    sensor_id: int
    split: str
    normalise: tuple[bool, bool] = (False, False)  # (tac, rgb) not an RGB JPEG on disk


@dataclass
class ScanResult:
    pairs: list[SourcePair]
    quarantine: list[Quarantined]

    @property
    def n_candidates(self) -> int:
        return len(self.pairs) + len(self.quarantine)

    @property
    def bad_fraction(self) -> float:
        return len(self.quarantine) / self.n_candidates if self.n_candidates else 0.0

    def quarantine_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(q) for q in self.quarantine], columns=["id", "file", "reason", "detail"])

    def summary(self) -> dict:
        return {"candidates": self.n_candidates, "good": len(self.pairs),
                "quarantined": len(self.quarantine), "bad_fraction": round(self.bad_fraction, 6),
                "by_reason": dict(sorted(Counter(q.reason for q in self.quarantine).items()))}


class PrepareError(StageError):
    pass


def parse_id(raw: str) -> int | None:
    """Dataset ids are non-negative integers ('007' is 7); anything else is ``None``."""
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if value <= MAX_SOURCE_ID else None


# ----------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionRow:
    line: int
    caption: str
    sensor_id: int


def read_captions(path: Path, default_sensor: int) -> tuple[dict[int, list[CaptionRow]], list[Quarantined]]:
    """Read ``index,caption[,sensor]`` line by line so one undecodable line costs only its own id."""
    rows: dict[int, list[CaptionRow]] = defaultdict(list)
    bad: list[Quarantined] = []
    raw_lines = path.read_bytes().splitlines()
    if not raw_lines:
        raise PrepareError(f"{path}: empty file (expected a header 'index,caption[,sensor]')")
    header = next(csv.reader([raw_lines[0].decode("utf-8-sig", errors="replace")]))
    header = [h.strip().lower() for h in header]
    if "index" not in header or "caption" not in header:
        raise PrepareError(f"{path}:1: header must have 'index' and 'caption' columns, got {header}")
    col = {name: header.index(name) for name in header}
    for line_no, raw in enumerate(raw_lines[1:], start=2):
        where = f"{path.name}:{line_no}"
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw_id = raw.split(b",", 1)[0].decode("ascii", errors="replace").strip()
            bad.append(Quarantined(raw_id, where, "bad_encoding", f"not UTF-8: {exc.reason} at byte {exc.start}"))
            continue
        fields = next(csv.reader([text]))
        raw_id = fields[col["index"]] if len(fields) > col["index"] else ""
        item_id = parse_id(raw_id)
        if item_id is None:
            bad.append(Quarantined(raw_id.strip(), where, "bad_id", f"id {raw_id!r} is not a non-negative integer"))
            continue
        caption = fields[col["caption"]] if len(fields) > col["caption"] else ""
        sensor_id = default_sensor
        if "sensor" in col and len(fields) > col["sensor"] and fields[col["sensor"]].strip():
            sensor_raw = fields[col["sensor"]].strip()
            if sensor_raw.lstrip("-").isdigit() and int(sensor_raw) >= -1:
                sensor_id = int(sensor_raw)
            else:
                log.warning("%s: sensor %r is not an integer; using unknown (-1)", where, sensor_raw)
                sensor_id = -1
        rows[item_id].append(CaptionRow(line_no, " ".join(caption.split()), sensor_id))
    return rows, bad


# ----------------------------------------------------------------------------- images


def scan_images(folder: Path, kind: str) -> tuple[dict[int, list[Path]], list[Quarantined]]:
    found: dict[int, list[Path]] = defaultdict(list)
    bad: list[Quarantined] = []
    if not folder.is_dir():
        return found, bad
    for path in sorted(folder.iterdir()):
        match = IMAGE_NAME.match(path.name)
        if not match or match["kind"].lower() != kind:
            continue
        item_id = parse_id(match["id"])
        if item_id is None:
            bad.append(Quarantined(match["id"], str(path), "bad_id", f"id {match['id']!r} in file name is not a non-negative integer"))
        else:
            found[item_id].append(path)
    return found, bad


@dataclass(frozen=True)
class ImageCheck:
    reason: str | None  # None when the image is good
    detail: str = ""
    needs_normalising: bool = False  # not an RGB JPEG on disk (PNG-as-.jpg, grayscale, RGBA...)


def check_image(path: Path, p: PrepareParams) -> ImageCheck:
    try:
        if path.stat().st_size == 0:
            return ImageCheck("corrupt_image", "zero-byte file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size  # header only: checked before any pixel is decoded
                if width * height > p.max_image_pixels:
                    return ImageCheck("image_too_large", f"{width}x{height} > prepare.max_image_pixels={p.max_image_pixels}")
                if min(width, height) < p.min_image_side:
                    return ImageCheck("image_too_small", f"{width}x{height} < prepare.min_image_side={p.min_image_side}")
                img.load()  # a truncated file fails here
                return ImageCheck(None, needs_normalising=(img.format != "JPEG" or img.mode != "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        return ImageCheck("corrupt_image", f"{type(exc).__name__}: {exc}")


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "P"):
            # composite transparency on white instead of letting convert() drop alpha to black
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")


# ----------------------------------------------------------------------------- splits


def stable_split(item_id: int, test_fraction: float) -> str:
    """Hash-based split: an id keeps its split when ids are added or removed."""
    bucket = int.from_bytes(hashlib.sha256(str(item_id).encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def read_splits(path: Path) -> dict[int, str]:
    splits: dict[int, str] = {}
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"index", "split"} - set(frame.columns)
    if missing:
        raise PrepareError(f"{path}:1: missing column(s) {sorted(missing)}")
    for offset, (raw_id, value) in enumerate(zip(frame["index"], frame["split"])):
        item_id, value = parse_id(raw_id), value.strip().lower()
        if item_id is None or value not in SPLITS:
            raise PrepareError(f"{path}:{offset + 2}: expected '<integer id>,train|test', got {raw_id!r},{value!r}")
        splits[item_id] = value
    return splits


# ----------------------------------------------------------------------------- scan


def scan_dataset(root: Path, captions_name: str, splits_name: str, p: PrepareParams) -> ScanResult:
    """Join captions and image pairs by id; every id ends up either in ``pairs`` or, once, in ``quarantine``."""
    captions_path = root / captions_name
    if not captions_path.is_file():
        raise PrepareError(f"{captions_path}: captions file not found (data.root={root})")
    captions, caption_bad = read_captions(captions_path, p.default_sensor)
    tac, tac_bad = scan_images(root / "images_tac", "tac")
    rgb, rgb_bad = scan_images(root / "images_rgb", "rgb")
    splits_path = root / splits_name
    splits = read_splits(splits_path) if splits_path.is_file() else {}

    quarantine: dict[str, Quarantined] = {}

    def flag(q: Quarantined) -> None:
        quarantine.setdefault(q.id, q)  # one row per bad id: the first (most fundamental) reason wins

    for q in caption_bad + tac_bad + rgb_bad:
        flag(q)
    pairs: list[SourcePair] = []
    all_ids = sorted(set(captions) | set(tac) | set(rgb))
    for item_id in tqdm(all_ids, desc="check pairs", unit="id"):
        key = str(item_id)
        if key in quarantine:
            continue
        rows = captions.get(item_id, [])
        distinct = {(r.caption, r.sensor_id) for r in rows}
        if len(distinct) > 1:
            lines = ",".join(str(r.line) for r in rows)
            flag(Quarantined(key, f"{captions_name}:{lines}", "duplicate_id", f"{len(rows)} caption rows disagree"))
            continue
        for kind, found in (("tac", tac), ("rgb", rgb)):
            if len(found.get(item_id, [])) > 1:
                names = ",".join(path.name for path in found[item_id])
                flag(Quarantined(key, names, "duplicate_id", f"several {kind} images for one id"))
        if key in quarantine:
            continue
        tac_paths, rgb_paths = tac.get(item_id), rgb.get(item_id)
        if not rows:
            some = (tac_paths or rgb_paths)[0]
            flag(Quarantined(key, str(some), "missing_caption", f"no row in {captions_name}"))
            continue
        where = f"{captions_name}:{rows[0].line}"
        if not rows[0].caption.strip(" ,"):
            flag(Quarantined(key, where, "empty_caption", "caption is empty or whitespace"))
            continue
        if not tac_paths and not rgb_paths:
            flag(Quarantined(key, where, "missing_images", "no tactile and no RGB image"))
            continue
        if not tac_paths:
            flag(Quarantined(key, str(rgb_paths[0]), "missing_tac", f"no images_tac/image_{item_id}_tac.jpg"))
            continue
        if not rgb_paths:
            flag(Quarantined(key, str(tac_paths[0]), "missing_rgb", f"no images_rgb/image_{item_id}_rgb.jpg"))
            continue
        checks = [check_image(path, p) for path in (tac_paths[0], rgb_paths[0])]
        failed = [(path, c) for path, c in zip((tac_paths[0], rgb_paths[0]), checks) if c.reason]
        if failed:
            path, check = failed[0]
            flag(Quarantined(key, str(path), check.reason, check.detail))
            continue
        split = splits.get(item_id) or stable_split(item_id, p.test_fraction)
        pairs.append(SourcePair(item_id, tac_paths[0], rgb_paths[0], rows[0].caption, rows[0].sensor_id,
                                split, (checks[0].needs_normalising, checks[1].needs_normalising)))
    ordered = sorted(quarantine.values(), key=lambda q: (REASONS.index(q.reason), q.id))
    return ScanResult(pairs, ordered)


# ----------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentSpec:
    """One copy's transform.  Rotation and flips are shared by the pair; crops and colour are not."""

    angle: float
    hflip: bool
    vflip: bool
    tac_crop: tuple[float, float, float]  # scale, x0, y0 (fractions of the image)
    rgb_crop: tuple[float, float, float]
    brightness: float
    contrast: float
    saturation: float

    def describe(self) -> str:
        flips = "".join(["h" if self.hflip else "", "v" if self.vflip else ""]) or "none"
        return (f"rot={self.angle:+.1f};flip={flips};tac_crop={self.tac_crop[0]:.2f};"
                f"rgb_crop={self.rgb_crop[0]:.2f};b={self.brightness:.2f};c={self.contrast:.2f};"
                f"s={self.saturation:.2f}")


def draw_augment(a: AugmentParams, source_id: int, copy: int) -> AugmentSpec:
    # seeded per (seed, id, copy): a copy is reproducible whatever else is in the dataset
    rng = np.random.default_rng([a.seed, source_id, copy])

    def crop() -> tuple[float, float, float]:
        scale = float(rng.uniform(*a.crop_scale))
        return scale, float(rng.uniform(0, 1 - scale)), float(rng.uniform(0, 1 - scale))

    jitter = lambda: float(rng.uniform(1 - a.color_jitter, 1 + a.color_jitter))  # noqa: E731
    return AugmentSpec(
        angle=float(rng.uniform(-a.rotation_deg, a.rotation_deg)),
        hflip=bool(a.hflip and rng.random() < 0.5),
        vflip=bool(a.vflip and rng.random() < 0.5),
        tac_crop=crop(), rgb_crop=crop(),
        brightness=jitter(), contrast=jitter(), saturation=jitter(),
    )


def _geometric(img: Image.Image, spec: AugmentSpec, crop: tuple[float, float, float]) -> Image.Image:
    w, h = img.size
    if spec.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if spec.vflip:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if spec.angle:
        img = img.rotate(spec.angle, resample=Image.Resampling.BICUBIC)
        # keep the largest centred rectangle with no empty corners
        t = math.radians(abs(spec.angle))
        keep = 1.0 / (math.cos(t) + math.sin(t))
        dx, dy = w * (1 - keep) / 2, h * (1 - keep) / 2
        img = img.crop((round(dx), round(dy), round(w - dx), round(h - dy)))
    cw, ch = img.size
    scale, x0, y0 = crop
    box = (round(x0 * cw), round(y0 * ch), round((x0 + scale) * cw), round((y0 + scale) * ch))
    return img.crop(box).resize((w, h), Image.Resampling.BICUBIC)


def augment_pair(tac: Image.Image, rgb: Image.Image, spec: AugmentSpec) -> tuple[Image.Image, Image.Image]:
    tac_out = _geometric(tac, spec, spec.tac_crop)
    rgb_out = _geometric(rgb, spec, spec.rgb_crop)
    # colour jitter on the photo only: the gel image's colours encode surface normals under the
    # sensor's fixed lights, so shifting them would fake a different geometry
    rgb_out = ImageEnhance.Brightness(rgb_out).enhance(spec.brightness)
    rgb_out = ImageEnhance.Contrast(rgb_out).enhance(spec.contrast)
    rgb_out = ImageEnhance.Color(rgb_out).enhance(spec.saturation)
    return tac_out, rgb_out


# ----------------------------------------------------------------------------- manifest


def build_manifest(pairs: list[SourcePair], p: PrepareParams, out_dir: Path, final_dir: Path) -> pd.DataFrame:
    """Write normalised originals and augmented copies into ``out_dir``; return the manifest.

    Paths in the manifest point at ``final_dir`` (where ``out_dir`` is swapped in) or at the
    untouched input file when it is already an RGB JPEG.
    """
    for kind in ("tac", "rgb"):
        (out_dir / f"images_{kind}").mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in tqdm(pairs, desc="prepare pairs", unit="pair"):
        copies = p.augment.copies if (pair.split == "train" or p.augment.apply_to_test) else 0
        images: dict[str, Image.Image] = {}
        paths: dict[str, str] = {}
        for kind, src, normalise in (("tac", pair.tac_path, pair.normalise[0]),
                                     ("rgb", pair.rgb_path, pair.normalise[1])):
            if copies or normalise:
                images[kind] = load_rgb(src)
            if normalise:
                name = f"images_{kind}/image_{pair.id}_{kind}.jpg"
                disk.save_image(out_dir / name, images[kind], quality=p.jpeg_quality)
                paths[kind] = str(final_dir / name)
            else:
                paths[kind] = str(src)
        rows.append(_manifest_row(pair, 0, str(pair.id), paths["tac"], paths["rgb"], "orig"))
        for copy in range(1, copies + 1):
            spec = draw_augment(p.augment, pair.id, copy)
            tac_img, rgb_img = augment_pair(images["tac"], images["rgb"], spec)
            item = f"{pair.id}_aug{copy}"
            for kind, img in (("tac", tac_img), ("rgb", rgb_img)):
                disk.save_image(out_dir / f"images_{kind}/image_{item}_{kind}.jpg", img, quality=p.jpeg_quality)
            rows.append(_manifest_row(pair, copy, item,
                                      str(final_dir / f"images_tac/image_{item}_tac.jpg"),
                                      str(final_dir / f"images_rgb/image_{item}_rgb.jpg"), spec.describe()))
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return frame.astype({"uid": "int64", "source_id": "int64", "copy": "int64", "sensor_id": "int64"})


def _manifest_row(pair: SourcePair, copy: int, item: str, tac: str, rgb: str, aug: str) -> dict:
    return {"uid": pair.id * UID_STRIDE + copy, "id": item, "source_id": pair.id, "copy": copy,
            "split": pair.split, "sensor_id": pair.sensor_id, "tac_path": tac, "rgb_path": rgb,
            "caption": pair.caption, "aug": aug}


def threshold_error(scan: ScanResult, max_bad_fraction: float, quarantine_csv: Path) -> str | None:
    if scan.n_candidates == 0:
        return "no image pairs or captions found in the dataset"
    if scan.bad_fraction <= max_bad_fraction:
        return None
    reasons = ", ".join(f"{r}={n}" for r, n in scan.summary()["by_reason"].items())
    return (f"{len(scan.quarantine)} of {scan.n_candidates} ids quarantined "
            f"({scan.bad_fraction:.1%} > prepare.max_bad_fraction={max_bad_fraction:.1%}): {reasons}. "
            f"See {quarantine_csv}")


def validation_tables(manifest: pd.DataFrame, summary: dict, max_bad_fraction: float) -> list:
    """The ``prepare`` boundary: manifest integrity, files on disk, quarantine under threshold."""
    checked = manifest.assign(
        tac_exists=manifest["tac_path"].map(lambda p: Path(p).is_file()),
        rgb_exists=manifest["rgb_path"].map(lambda p: Path(p).is_file()),
        caption_stripped=manifest["caption"].fillna("").astype(str).str.strip(),
    )
    from touchvl import checks

    gxe = checks.gxe
    critical = dict(severity="critical")
    manifest_checks = [
        gxe.ExpectTableColumnsToMatchSet(column_set=MANIFEST_COLUMNS, exact_match=False, **critical),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, **critical),
        gxe.ExpectColumnValuesToBeUnique(column="uid", **critical),
        gxe.ExpectColumnValuesToNotBeNull(column="uid", **critical),
        gxe.ExpectColumnValuesToBeUnique(column="id", **critical),
        gxe.ExpectColumnValueLengthsToBeBetween(column="caption_stripped", min_value=1, **critical),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "test"], **critical),
        gxe.ExpectColumnValuesToBeInSet(column="tac_exists", value_set=[True], **critical),
        gxe.ExpectColumnValuesToBeInSet(column="rgb_exists", value_set=[True], **critical),
        gxe.ExpectColumnValuesToBeBetween(column="sensor_id", min_value=-1, **critical),
        # warnings: a usable but suspicious dataset
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=["train", "test"], severity="warning"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="caption_stripped", max_value=500, severity="warning"),
    ]
    # split hygiene: every source id lives in exactly one split
    per_source = manifest.groupby("source_id")["split"].nunique().rename("splits_per_source").reset_index()
    source_checks = [gxe.ExpectColumnValuesToBeBetween(column="splits_per_source", min_value=1, max_value=1, **critical)]
    quarantine = pd.DataFrame([{"quarantined": summary["quarantined"], "candidates": summary["candidates"],
                                "bad_fraction": summary["bad_fraction"]}])
    quarantine_checks = [gxe.ExpectColumnValuesToBeBetween(column="bad_fraction", min_value=0.0, max_value=max_bad_fraction, **critical)]
    return [checks.Table("manifest", checked, manifest_checks, id_column="uid"),
            checks.Table("source_splits", per_source, source_checks, id_column="source_id"),
            checks.Table("quarantine", quarantine, quarantine_checks)]
