"""The prepare step's core: join captions to image pairs by id, quarantine bad inputs, augment, split.

Reads a dataset folder in SSVTP layout (``data.root``)::

    images_tac/image_{id}_tac.jpg   images_rgb/image_{id}_rgb.jpg
    captions.csv  index,caption[,sensor]      split.csv (optional)  index,split

Writes ``data/prepared/manifest.csv`` (one row per image pair, originals and augmented copies),
augmented/normalised images under ``data/prepared/images_{tac,rgb}/`` and
``artifacts/reports/prepare/quarantine.csv`` (``id,file,reason,detail``, one row per bad id).

Bad inputs are quarantined, never fatal and never able to drop a good row; the stage fails only
when the quarantined fraction exceeds ``prepare.max_bad_fraction``.  CSV files are read record by record
(touchvl.data.csvfile) and images decoded through one path (touchvl.imagefile).
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance
from tqdm import tqdm

from touchvl import disk
from touchvl import imagefile
from touchvl.data import csvfile
from touchvl.disk import MANIFEST_COLUMNS
from touchvl.errors import StageError
from touchvl.params import AugmentParams, PrepareParams

log = logging.getLogger(__name__)

REASONS = (
    "bad_encoding", "bad_row", "bad_id", "duplicate_id", "bad_sensor", "missing_caption", "empty_caption",
    "caption_too_long", "missing_images", "missing_tac", "missing_rgb", "corrupt_image", "unsupported_image",
    "image_too_small", "image_too_large", "constant_image",
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
    digits = raw.lstrip("0") or "0"
    if len(digits) > len(str(MAX_SOURCE_ID)):  # before int(): thousands of digits raise (and are slow)
        return None
    value = int(digits)
    return value if value <= MAX_SOURCE_ID else None


def intended_id(raw: str) -> int | None:
    """The id a malformed one spells ('7.0', '+7', '\uff11\uff12', '13x' -> 7, 7, 12, 13), else ``None``.

    Only to report a mistyped id once -- one quarantine row, not a bad row plus an id whose caption or image
    is missing -- never to accept data under a guessed id.  A single run of digits counts ('7.5' is no id).
    """
    text = "".join(c for c in unicodedata.normalize("NFKC", raw[:64]) if unicodedata.category(c) != "Cf").strip()
    number = re.fullmatch(r"\+?([0-9]+)(?:\.0*)?", text)
    runs = [number[1]] if number else re.findall(r"[0-9]+", text)
    return parse_id(runs[0]) if len(runs) == 1 else None


def _short(text: str, limit: int = 40) -> str:
    text = csvfile.printable(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ----------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionRow:
    line: int
    caption: str
    sensor_id: int


SENSOR = re.compile(r"-?[0-9]{1,19}")  # ASCII digits only: '²'.isdigit() is True, and int() of 5,000 digits raises


def _read_records(path: Path) -> Iterator[csvfile.Record]:
    try:
        return iter(csvfile.read_records(path))
    except OSError as exc:
        raise PrepareError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _header(path: Path, records: Iterator[csvfile.Record], required: tuple[str, ...], expected: str) -> dict[str, int]:
    """Column positions from the header record, or a clear error naming the file and line."""
    first = next(records, None)
    if first is None:
        raise PrepareError(f"{path}: empty file (expected a header '{expected}')")
    if first.kind == "bad_row":  # a header that is not UTF-8 is still read: its required columns are ASCII
        raise PrepareError(f"{path}:{first.line}: header: {first.error}")
    header = [csvfile.printable(h).strip().lower() for h in first.fields]
    missing = [name for name in required if name not in header]
    if missing:
        raise PrepareError(f"{path}:{first.line}: missing column(s) {missing} (expected '{expected}', got {header})")
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:
        raise PrepareError(f"{path}:{first.line}: column(s) {repeated} appear twice in the header")
    return {name: header.index(name) for name in header}


def read_captions(path: Path, p: PrepareParams) -> tuple[dict[int, list[CaptionRow]], list[Quarantined]]:
    """Read ``index,caption[,sensor]`` record by record so one bad record costs only its own id."""
    rows: dict[int, list[CaptionRow]] = defaultdict(list)
    bad: list[Quarantined] = []
    records = _read_records(path)
    col = _header(path, records, ("index", "caption"), "index,caption[,sensor]")
    for record in records:
        fields = record.fields
        where = f"{path.name}:{record.line}"
        raw_id = fields[col["index"]] if len(fields) > col["index"] else ""
        shown_id = csvfile.printable(raw_id).strip()
        if record.error:
            bad.append(Quarantined(shown_id, where, record.kind, record.error))
            continue
        if len(fields) > len(col):
            bad.append(Quarantined(shown_id, where, "bad_row", f"{len(fields)} fields, the header has {len(col)} "
                                   "(a caption with a comma must be quoted)"))
            continue
        item_id = parse_id(raw_id)
        if item_id is None:
            bad.append(Quarantined(shown_id, where, "bad_id", f"id {_short(raw_id)} is not a non-negative integer"))
            continue
        caption = " ".join((fields[col["caption"]] if len(fields) > col["caption"] else "").split())
        if len(caption) > p.max_caption_chars:
            bad.append(Quarantined(shown_id, where, "caption_too_long",
                                   f"{len(caption)} characters > prepare.max_caption_chars={p.max_caption_chars}"))
            continue
        sensor_raw = fields[col["sensor"]].strip() if "sensor" in col and len(fields) > col["sensor"] else ""
        sensor_id = int(sensor_raw) if SENSOR.fullmatch(sensor_raw) else None
        if not sensor_raw:
            sensor_id = p.default_sensor
        elif sensor_id is None or not -1 <= sensor_id <= p.max_sensor_id:
            bad.append(Quarantined(shown_id, where, "bad_sensor",
                                   f"sensor {_short(sensor_raw)} is not an integer in -1..{p.max_sensor_id} "
                                   f"(-1 = unknown; prepare.max_sensor_id={p.max_sensor_id})"))
            continue
        rows[item_id].append(CaptionRow(record.line, caption, sensor_id))
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
            # printable: a file name that is not UTF-8 must not crash the quarantine report
            bad.append(Quarantined(csvfile.printable(match["id"]), csvfile.printable(str(path)), "bad_id",
                                   f"id {_short(match['id'])} in file name is not a non-negative integer"))
        else:
            found[item_id].append(path)
    return found, bad


@dataclass(frozen=True)
class ImageCheck:
    reason: str | None  # None when the image is good
    detail: str = ""
    needs_normalising: bool = False  # not a plain RGB JPEG on disk (PNG-as-.jpg, grayscale, 16-bit, EXIF-rotated...)


def check_image(path: Path, p: PrepareParams) -> ImageCheck:
    """Decode the image the way :func:`load_rgb` will (touchvl.imagefile) and say whether it may be published."""
    try:
        if path.stat().st_size == 0:
            return ImageCheck("corrupt_image", "zero-byte file")
        with imagefile.open_image(path, p.max_image_pixels) as img:  # header only: size checked before decoding
            width, height = img.size
            if min(width, height) < p.min_image_side:
                return ImageCheck("image_too_small", f"{width}x{height} < prepare.min_image_side={p.min_image_side}")
            decoded = imagefile.decode_open(img)
    except imagefile.ImageRejected as exc:
        return ImageCheck(exc.reason, exc.detail)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises on a hostile file, the file is bad
        return ImageCheck("corrupt_image", f"{type(exc).__name__}: {exc}")
    if imagefile.pixel_std(decoded.rgb) == 0.0:
        # nothing to learn from, and the signature of a failed conversion: never published
        return ImageCheck("constant_image", f"every pixel is {decoded.rgb.getpixel((0, 0))} (mode {decoded.mode})")
    return ImageCheck(None, needs_normalising=not decoded.as_stored)


def load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """The RGB pixels of an image :func:`check_image` accepted (EXIF orientation applied, deep samples scaled)."""
    return imagefile.read_rgb(path, max_pixels, "prepare.max_image_pixels")


# ----------------------------------------------------------------------------- splits


def stable_split(item_id: int, test_fraction: float) -> str:
    """Hash-based split: an id keeps its split when ids are added or removed."""
    bucket = int.from_bytes(hashlib.sha256(str(item_id).encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def read_splits(path: Path) -> dict[int, str]:
    """``index,split``.  Unlike captions, any bad record is an error naming its line, not a quarantine: the
    file decides which ids are test ids, and a guessed split would leak test ids into training."""
    splits: dict[int, str] = {}
    seen: dict[int, int] = {}
    records = _read_records(path)
    col = _header(path, records, ("index", "split"), "index,split")
    for record in records:
        if record.error:
            raise PrepareError(f"{path}:{record.line}: {record.error}")
        fields = record.fields
        if len(fields) > len(col):
            raise PrepareError(f"{path}:{record.line}: {len(fields)} fields, the header has {len(col)}")
        raw_id = fields[col["index"]] if len(fields) > col["index"] else ""
        value = (fields[col["split"]] if len(fields) > col["split"] else "").strip().lower()
        item_id = parse_id(raw_id)
        if item_id is None or value not in SPLITS:
            raise PrepareError(f"{path}:{record.line}: expected '<integer id>,train|test', "
                               f"got {_short(raw_id)},{_short(value)}")
        if splits.get(item_id, value) != value:
            raise PrepareError(f"{path}:{record.line}: id {item_id} is already {splits[item_id]!r} "
                               f"at line {seen[item_id]}")
        splits[item_id] = value
        seen.setdefault(item_id, record.line)
    return splits


# ----------------------------------------------------------------------------- scan


def scan_dataset(root: Path, captions_name: str, splits_name: str, p: PrepareParams) -> ScanResult:
    """Join captions and image pairs by id; every id ends up either in ``pairs`` or, once, in ``quarantine``."""
    captions_path = root / captions_name
    if not captions_path.is_file():
        raise PrepareError(f"{captions_path}: captions file not found (data.root={root})")
    captions, caption_bad = read_captions(captions_path, p)
    tac, tac_bad = scan_images(root / "images_tac", "tac")
    rgb, rgb_bad = scan_images(root / "images_rgb", "rgb")
    splits_path = root / splits_name
    splits = read_splits(splits_path) if splits_path.is_file() else {}

    quarantine: dict[str, Quarantined] = {}

    def flag(q: Quarantined) -> None:
        quarantine.setdefault(q.id, q)  # one row per bad id: the first (most fundamental) reason wins

    for q in caption_bad + tac_bad + rgb_bad:
        flag(q)
    # a mistyped id ('7.0' for 7) is one bad item: its bad_id row also explains the caption or image that id 7
    # lacks, instead of a second row (missing_caption) that would count the item twice against max_bad_fraction
    misspelt: dict[tuple[str, int], Quarantined] = {}
    for source, bad in (("caption", caption_bad), ("tac", tac_bad), ("rgb", rgb_bad)):
        for q in bad:
            meant = intended_id(q.id) if q.reason == "bad_id" else None
            if meant is not None:
                misspelt.setdefault((source, meant), q)

    def flag_missing(item_id: int, missing: Quarantined, sources: tuple[str, ...]) -> None:
        for source in sources:
            q = misspelt.pop((source, item_id), None)
            if q is not None and quarantine.get(q.id) is q:
                del quarantine[q.id]
                flag(Quarantined(missing.id, q.file, "bad_id",
                                 f"{q.detail} (read as {item_id}, which is otherwise {missing.reason})"))
                return
        flag(missing)

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
            flag_missing(item_id, Quarantined(key, str(some), "missing_caption", f"no row in {captions_name}"), ("caption",))
            continue
        where = f"{captions_name}:{rows[0].line}"
        if not rows[0].caption.strip(" ,"):
            flag(Quarantined(key, where, "empty_caption", "caption is empty or whitespace"))
            continue
        if not tac_paths and not rgb_paths:
            flag_missing(item_id, Quarantined(key, where, "missing_images", "no tactile and no RGB image"), ("tac", "rgb"))
            continue
        if not tac_paths:
            flag_missing(item_id, Quarantined(key, str(rgb_paths[0]), "missing_tac", f"no images_tac/image_{item_id}_tac.jpg"),
                         ("tac",))
            continue
        if not rgb_paths:
            flag_missing(item_id, Quarantined(key, str(tac_paths[0]), "missing_rgb", f"no images_rgb/image_{item_id}_rgb.jpg"),
                         ("rgb",))
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
                images[kind] = load_rgb(src, p.max_image_pixels)
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


def validation_tables(manifest: pd.DataFrame, summary: dict, max_bad_fraction: float, *,
                      max_sensor_id: int | None = None, max_image_pixels: int | None = None) -> list:
    """The ``prepare`` boundary: manifest integrity, files on disk, no constant image, quarantine under threshold."""
    # measured on the files as published (not taken from the code that wrote them): a constant image is what a
    # wrong bit-depth conversion or an augmentation cropping into a flat region looks like
    paths = [*manifest["tac_path"], *manifest["rgb_path"]]
    std = {path: imagefile.file_std(path, max_image_pixels)
           for path in tqdm(dict.fromkeys(paths), desc="check prepared images", unit="image", leave=False)}
    checked = manifest.assign(
        tac_exists=manifest["tac_path"].map(lambda p: Path(p).is_file()),
        rgb_exists=manifest["rgb_path"].map(lambda p: Path(p).is_file()),
        caption_stripped=manifest["caption"].fillna("").astype(str).str.strip(),
        tac_std=manifest["tac_path"].map(std), rgb_std=manifest["rgb_path"].map(std),
    )
    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
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
        gxe.ExpectColumnValuesToBeBetween(column="sensor_id", min_value=-1, max_value=max_sensor_id, **critical),
        # zero variance: a constant image (NaN, a missing file, is the *_exists expectations' to report)
        gxe.ExpectColumnValuesToBeBetween(column="tac_std", min_value=0.0, strict_min=True, **critical),
        gxe.ExpectColumnValuesToBeBetween(column="rgb_std", min_value=0.0, strict_min=True, **critical),
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
