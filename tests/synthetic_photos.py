"""Photo-like JPEGs for decode tests and benches: smooth gradients, soft blobs, hard-edged shapes, sensor noise.

Flat colour or pure noise would flatter or wreck any resampler; real photos have all three of smooth
regions, edges and fine texture, and so do these.  Deterministic per seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def synthetic_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= width
    y /= height
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):  # a tilted linear gradient plus a few soft blobs per channel (lighting, out-of-focus)
        a, b, base = rng.uniform(-80, 80), rng.uniform(-80, 80), rng.uniform(60, 190)
        channel = base + a * x + b * y
        for _ in range(4):
            cx, cy, r, amp = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3), rng.uniform(-60, 60)
            channel += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img[..., c] = channel
    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(photo)
    scale = min(width, height)
    for _ in range(12):  # hard edges at every scale: objects, text-like strokes
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.02, 0.3) * scale, rng.uniform(0.02, 0.3) * scale
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=max(1, int(rng.uniform(1, 6))))
    pixels = np.asarray(photo).astype(np.float32)
    pixels += rng.normal(0, 6, pixels.shape)  # sensor noise: the high frequencies a resampler must not alias
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_jpeg(path: Path, width: int, height: int, seed: int = 0, quality: int = 90) -> Path:
    synthetic_photo(width, height, seed).save(path, quality=quality)
    return path
