"""ImageBind's vision preprocessing, exact (the default) and fast (``embed.fast_decode``).

Exact: Meta's ``load_and_transform_vision_data`` transform for transform (PIL decode at full size,
shorter side 224 bicubic on the PIL image, centre crop 224, ToTensor, CLIP Normalize), bit for bit.

Fast: for JPEG sources, ``Image.draft`` asks libjpeg to decode at the smallest DCT scale (1/2, 1/4,
1/8) that keeps both sides >= 224, so a 1024-px photo is decoded straight to 256 px and the
inverse DCT and colour conversion do 1/16 of the work; then the same PIL bicubic resize and centre
crop, and normalisation as one fused tensor op instead of ToTensor + Normalize.  The pixels differ
from the exact path's slightly (the DCT downscale is a box-like filter, then bicubic from a smaller
image; tests/test_fast_decode.py bounds it), so the fast path has its own version string and hence
its own encoder fingerprint and cache namespace.  Other formats take the exact path.

torch is imported on first use, not with the module: the version strings decide the encoder fingerprint, and a
fully cached ``embed`` rerun computes that fingerprint without ever loading torch. torchvision is never imported:
the exact path runs the operations of its four transforms itself (see :func:`preprocess_image`).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

SIZE = 224
PREPROCESS_VERSION = "clip224-v2"  # v2: PIL-side resize, bit-identical to ImageBind (v1 resized tensors)
FAST_PREPROCESS_VERSION = "clip224-jpegdraft-v1"  # embed.fast_decode: DCT-domain JPEG downscale first
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Preprocess = Callable[[Image.Image], "torch.Tensor"]


@functools.cache
def _mean_std():
    import torch

    return (torch.as_tensor(CLIP_MEAN, dtype=torch.float32).view(-1, 1, 1),
            torch.as_tensor(CLIP_STD, dtype=torch.float32).view(-1, 1, 1))


@functools.cache
def _scale_shift():
    """(x / 255 - mean) / std == x * scale + shift: one multiply-add per value on uint8 input."""
    import torch

    scale = torch.tensor([1 / (255 * s) for s in CLIP_STD], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=torch.float32).view(3, 1, 1)
    return scale, shift


def preprocess_image(img: Image.Image) -> torch.Tensor:
    """[3, 224, 224] float32: RGB, shorter side 224 bicubic, centre crop 224, CLIP mean/std (Meta's, exactly).

    Meta's ``load_and_transform_vision_data`` is torchvision's Resize(224, BICUBIC) + CenterCrop(224) + ToTensor
    + Normalize on the PIL image; these are the operations those four run on a PIL image, in their order and
    dtypes (PIL's bicubic resize and crop, uint8 -> float32 / 255, then subtract the mean and divide by the std),
    so the tensor is the same to the last bit (tests/test_encoders.py compares it with torchvision's Compose on
    many sizes and modes) without importing torchvision, whose import (~2 s, all its model zoo) every process
    that embeds one query would pay."""
    import torch

    img = img.convert("RGB")
    width, height = img.size
    w, h = resized_size(width, height)
    if (w, h) != (width, height):  # Resize returns the image itself when it already has the size
        img = img.resize((w, h), Image.BICUBIC)
    top, left = int(round((h - SIZE) / 2.0)), int(round((w - SIZE) / 2.0))  # CenterCrop's rounding
    img = img.crop((left, top, left + SIZE, top + SIZE))
    tensor = torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
    mean, std = _mean_std()
    return tensor.sub_(mean).div_(std)  # Normalize


def resized_size(width: int, height: int, size: int = SIZE) -> tuple[int, int]:
    """torchvision Resize(size) on a PIL image: shorter side to ``size``, the longer truncated, as it does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def fast_pixels(img: Image.Image, size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3] of a JPEG not yet loaded: DCT-domain draft, then bicubic straight into the crop.

    The output geometry is the exact path's: Resize(size) of the *original* size, then CenterCrop(size).
    The crop is expressed as a box in the decoded image's coordinates, so PIL resamples only the pixels
    that survive the crop (its filter still reads the neighbours outside the box, as resize-then-crop does).
    """
    width, height = img.size
    w, h = resized_size(width, height, size)
    # CenterCrop's rounding (torchvision: int(round((h - size) / 2.0)))
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    # draft picks scale 1/s, s = min(width // size, height // size) rounded down to 8, 4, 2 or 1, so both
    # sides stay >= size; it returns the original extent in decoded coordinates (0, 0, width/s, height/s)
    drafted = img.draft("RGB", (size, size))
    shrink = drafted[1][2] / width if drafted else 1.0
    sx, sy = width / w * shrink, height / h * shrink
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    # np.array, not asarray: a writable copy (torch warns on read-only buffers), 150 kB
    return np.array(img.convert("RGB").resize((size, size), Image.BICUBIC, box=box))


def normalize_pixels(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] with CLIP mean/std (batched or single)."""
    # channel-planar while still uint8 (a quarter of the bytes to move), then float and an in-place
    # multiply-add: measured 0.33 ms a 224-px image against 0.62 ms for ToTensor + Normalize
    import torch

    scale, shift = _scale_shift()
    t = torch.as_tensor(pixels).movedim(-1, -3).contiguous().float()
    return t.mul_(scale).add_(shift)


def preprocess_image_fast(img: Image.Image) -> torch.Tensor:
    """[3, 224, 224] float32 like :func:`preprocess_image`; a JPEG not yet loaded is decoded at a reduced
    DCT scale (:func:`fast_pixels`), anything else takes the exact path."""
    if img.format != "JPEG" or not getattr(img, "tile", None):
        return preprocess_image(img)
    return normalize_pixels(fast_pixels(img))


def preprocess_fn(fast_decode: bool) -> Preprocess:
    """The module-level function (picklable for DataLoader workers) of the chosen path."""
    return preprocess_image_fast if fast_decode else preprocess_image


def preprocess_version(fast_decode: bool) -> str:
    return FAST_PREPROCESS_VERSION if fast_decode else PREPROCESS_VERSION
