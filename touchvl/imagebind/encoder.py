"""ImageBind vision and text towers on Meta's model code, without its audio/video stack.

``imagebind``'s package ``__init__`` imports ``imagebind.data``, which needs torchaudio and
pytorchvideo (broken on current torchvision).  The model code itself needs only torch, timm,
einops, ftfy, regex and iopath, so we import ``imagebind.models.imagebind_model`` through a bare
package entry and do ImageBind's vision preprocessing ourselves (the same transforms, or the fast JPEG path of
``embed.fast_decode``: touchvl/imagebind/preprocess.py).

Encoders: ``imagebind_huge`` (Meta's weights, from ``embed.checkpoint``, ``$IMAGEBIND_CHECKPOINT``
or ``<checkpoint_dir>/imagebind_huge.pth``) and ``imagebind_tiny`` (the offline default, a smoke encoder:
weights from the ``pretrain_smoke`` stage, ``<embed.smoke_dir>/imagebind_tiny.pt``, loaded by the same code
as Meta's file; or random weights from a fixed seed with ``embed.random_weights``).

    touchvl download-weights --dest .checkpoints    # only when you ask: 4.5 GB, CC-BY-NC

torch is imported only when a model is built or run, never with this module: the fingerprint (config,
checkpoint sha256, preprocessing version) is plain Python, and :class:`ImageBindEncoder` builds its model on
first use, so a fully cached ``embed`` rerun never loads torch.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import types
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from touchvl import disk
from touchvl.devices import resolve_device
from touchvl.errors import StageError
from touchvl.imagebind.preprocess import (CLIP_MEAN, CLIP_STD, PREPROCESS_VERSION, Preprocess,  # noqa: F401 (re-exported)
                                          preprocess_fn, preprocess_image, preprocess_version)
from touchvl.params import EmbedParams

if TYPE_CHECKING:
    import torch

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
CHECKPOINT_ENV = "IMAGEBIND_CHECKPOINT"
SMOKE_CHECKPOINT_NAME = "imagebind_tiny.pt"  # what pretrain_smoke writes into embed.smoke_dir
KEPT_MODALITIES = ("vision", "text")
MODULE_DICTS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
KEPT_PREFIXES = tuple(f"{attr}.{m}." for attr in MODULE_DICTS for m in KEPT_MODALITIES)

ENCODER_CONFIGS: dict[str, dict] = {
    # exactly the arguments of Meta's imagebind_huge()
    "imagebind_huge": dict(vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16, text_embed_dim=1024,
                           text_num_blocks=24, text_num_heads=16, out_embed_dim=1024, audio_drop_path=0.1,
                           imu_drop_path=0.7),
    # 0.3 M vision/text parameters once the unused towers are dropped (those are shrunk too, so building stays
    # cheap); 28-px patches (64 tokens at 224 px) keep smoke pretraining within a minute on a 2-core CPU
    "imagebind_tiny": dict(kernel_size=(2, 28, 28), out_embed_dim=64, vision_embed_dim=64, vision_num_blocks=2, vision_num_heads=2,
                           text_embed_dim=64, text_num_blocks=2, text_num_heads=2, audio_embed_dim=16,
                           audio_num_blocks=1, audio_num_heads=1, depth_embed_dim=16, depth_num_blocks=1,
                           depth_num_heads=1, thermal_embed_dim=16, thermal_num_blocks=1, thermal_num_heads=1,
                           imu_embed_dim=16, imu_num_blocks=1, imu_num_heads=1),
}


class EncoderError(StageError):
    """Missing or unfitting weights, unknown encoder, unavailable device: printed without a traceback."""


def imagebind_model_module() -> types.ModuleType:
    """``imagebind.models.imagebind_model`` without running ``imagebind/__init__.py``."""
    if "imagebind.models.imagebind_model" in sys.modules:
        return sys.modules["imagebind.models.imagebind_model"]
    if "imagebind" not in sys.modules:
        spec = importlib.util.find_spec("imagebind")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise EncoderError("package 'imagebind' not installed (make setup installs imagebind-unofficial)")
        package = types.ModuleType("imagebind")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["imagebind"] = package
    with _timm_layers():
        import imagebind.models.imagebind_model as module

    return module


@contextlib.contextmanager
def _timm_layers():
    """``from timm.layers import DropPath, trunc_normal_`` -- all Meta's model code takes from timm -- answered by
    timm's own ``timm/layers/drop.py`` and ``weight_init.py`` (they import only torch) under bare package entries,
    while the model code imports. timm's package ``__init__`` imports its whole model zoo and, through
    ``timm.layers._fx``, torchvision's: ~2.5 s of every process that loads the encoder to embed one query. The
    bare entries are removed afterwards, so a later ``import timm`` gets the real package. With timm already
    imported, or not installed as expected, the real package is used."""
    if "timm" in sys.modules:
        yield
        return
    spec = importlib.util.find_spec("timm")
    layers = Path(next(iter(spec.submodule_search_locations or []), "")) / "layers" if spec else None
    if layers is None or not (layers / "drop.py").is_file() or not (layers / "weight_init.py").is_file():
        yield
        return
    bare = {"timm": types.ModuleType("timm"), "timm.layers": types.ModuleType("timm.layers")}
    bare["timm"].__path__, bare["timm.layers"].__path__ = [str(layers.parent)], [str(layers)]
    sys.modules.update(bare)
    try:
        bare["timm.layers"].DropPath = importlib.import_module("timm.layers.drop").DropPath
        bare["timm.layers"].trunc_normal_ = importlib.import_module("timm.layers.weight_init").trunc_normal_
        yield
    finally:
        for name, module in bare.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    package_dir = Path(imagebind_model_module().__file__).parents[1]  # registers the bare package first
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    return SimpleTokenizer(bpe_path=str(package_dir / "bpe" / "bpe_simple_vocab_16e6.txt.gz"))


def tokenize(texts: list[str]) -> torch.Tensor:
    """[B, 77] token ids with ImageBind's BPE tokenizer and vocabulary."""
    tokenizer = _tokenizer()
    # SimpleTokenizer drops the batch axis for a single text; put it back
    return tokenizer(list(texts)).reshape(len(texts), tokenizer.context_length)


@dataclass(frozen=True)
class EncoderSpec:
    name: str = "imagebind_tiny"
    checkpoint: Path | None = None
    cache_dir: Path = Path(".checkpoints")
    seed: int = 0
    device: str = "auto"
    config_overrides: tuple[tuple[str, object], ...] = ()
    """Merged over ``ENCODER_CONFIGS[name]`` (a tuple so the spec stays hashable): scaled-down tests."""
    fast_decode: bool = False
    """Fast JPEG preprocessing (DCT-domain downscale): other pixels, so another fingerprint and cache namespace."""

    def config(self) -> dict:
        if self.name not in ENCODER_CONFIGS:
            raise EncoderError(f"unknown encoder {self.name!r}; choose one of {sorted(ENCODER_CONFIGS)}")
        return {**ENCODER_CONFIGS[self.name], **dict(self.config_overrides)}


def smoke_checkpoint_path(p: EmbedParams) -> Path | None:
    """The pretrain_smoke checkpoint the tiny encoder loads, or None (huge, random weights, explicit file)."""
    if p.encoder != "imagebind_tiny" or p.random_weights or p.checkpoint:
        return None
    return p.smoke_dir / SMOKE_CHECKPOINT_NAME


def encoder_spec(p: EmbedParams) -> EncoderSpec:
    """The encoder the ``embed`` params describe (every query must be encoded by this same spec)."""
    return EncoderSpec(name=p.encoder, checkpoint=p.checkpoint or smoke_checkpoint_path(p),
                       cache_dir=p.checkpoint_dir, seed=p.seed, device=p.device, fast_decode=p.fast_decode)


def resolve_checkpoint(spec: EncoderSpec) -> Path | None:
    """imagebind_huge: the first of spec.checkpoint, $IMAGEBIND_CHECKPOINT, cache_dir that is set."""
    if spec.name != "imagebind_huge":
        if spec.checkpoint and not Path(spec.checkpoint).is_file():
            raise EncoderError(f"{spec.name} weights not found at {spec.checkpoint}: `dvc repro pretrain_smoke` "
                               "writes the smoke encoder's checkpoint (or set embed.random_weights: true for "
                               "random weights, which see nothing)")
        return spec.checkpoint
    if spec.checkpoint:
        path = Path(spec.checkpoint)
    elif os.environ.get(CHECKPOINT_ENV):
        path = Path(os.environ[CHECKPOINT_ENV])
    else:
        path = spec.cache_dir / "imagebind_huge.pth"
    if not path.is_file():
        raise EncoderError(f"imagebind_huge weights not found at {path}. Set embed.checkpoint or "
                           f"{CHECKPOINT_ENV} to the file, or download it once with "
                           f"`touchvl download-weights --dest {spec.cache_dir}` (4.5 GB, CC-BY-NC).")
    return path


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return disk.sha256_file_memo(path)  # a 4.5 GB file: hashed once per version, not once per run


def checkpoint_sha256(path: Path) -> str:
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def fingerprint_info(spec: EncoderSpec) -> dict:
    """What decides the vectors: encoder, its config, the weights, the preprocessing."""
    checkpoint = resolve_checkpoint(spec)
    return {"encoder": spec.name, "config": spec.config(),
            "weights": checkpoint_sha256(checkpoint) if checkpoint else f"random-seed-{spec.seed}",
            # the exact path keeps its old version string, so existing caches and fingerprints stay valid
            "preprocess": preprocess_version(spec.fast_decode), "smoke": is_smoke(spec)}


def is_smoke(spec: EncoderSpec) -> bool:
    """Every encoder but Meta's weights is a smoke encoder: its results show the pipeline, not the field."""
    return spec.name != "imagebind_huge"


def smoke_note(info: dict) -> str:
    """The warning every output of a smoke encoder carries (meta.json, metrics, gallery title)."""
    if not info.get("smoke"):
        return ""
    if str(info.get("weights", "")).startswith("random-seed-"):
        return f"{info['encoder']} has random weights: these embeddings are for smoke runs only"
    return (f"{info['encoder']} is a smoke encoder pretrained on the sample's training photos and captions: "
            "these embeddings are for smoke runs only")


def _digest(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(spec: EncoderSpec) -> str:
    """Stable 16-hex id of :func:`fingerprint_info`, computable without building the model."""
    return _digest(fingerprint_info(spec))


def load_state(model: torch.nn.Module, state: dict) -> None:
    """Load the vision/text tensors of a checkpoint; any other architecture fails naming the tensors.

    Accepts a raw state dict or one wrapped under ``state_dict`` / ``model``.
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    wanted = model.state_dict()
    kept = {k: v for k, v in state.items() if k.startswith(KEPT_PREFIXES)}
    mismatched = [f"{k}: expected {tuple(wanted[k].shape)}, found {tuple(v.shape)}"
                  for k, v in kept.items() if k in wanted and v.shape != wanted[k].shape]
    if mismatched:
        raise EncoderError(f"checkpoint does not fit this encoder ({len(mismatched)} tensors differ): "
                           + "; ".join(mismatched[:5]))
    missing = sorted(set(wanted) - set(kept))
    # extra vision/text tensors (e.g. more blocks) mean another architecture even when shapes agree
    unexpected = sorted(set(kept) - set(wanted))
    if missing or unexpected:
        raise EncoderError(f"checkpoint does not fit this encoder: {len(missing)} vision/text tensors missing "
                           f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    model.load_state_dict(kept)


def build_model(spec: EncoderSpec) -> torch.nn.Module:
    """Meta's ImageBindModel of ``spec``'s config with only the vision and text towers, weights drawn
    from ``spec.seed`` (identical in every run; a checkpoint, if any, is loaded by the caller)."""
    import torch

    module = imagebind_model_module()
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG stream
        torch.manual_seed(spec.seed)
        model = module.ImageBindModel(**spec.config())
    for attr in MODULE_DICTS:  # audio, depth, thermal, imu are never used: free their memory
        modules = getattr(model, attr)
        for key in [k for k in modules.keys() if k not in KEPT_MODALITIES]:
            del modules[key]
    return model


class ImageBindEncoder:
    """Vision and text towers of ImageBind, eval mode, on ``spec.device``.

    Built at once by default, so a wrong device or checkpoint fails here. With ``lazy=True`` constructing one
    only resolves the checkpoint file and computes the fingerprint (no torch); the device is resolved and the
    model built and loaded on first use (``device``, ``model``, ``encode_*``), so a caller whose every vector is
    cached (the ``embed`` stage's rerun) never pays for torch or the model.
    """

    def __init__(self, spec: EncoderSpec, lazy: bool = False):
        self.spec = spec
        self.name = spec.name
        self._checkpoint = resolve_checkpoint(spec)  # now, not at the first miss: a missing file fails fast
        self.dim = int(spec.config()["out_embed_dim"])
        self.is_smoke = is_smoke(spec)
        self._info = fingerprint_info(spec)
        self.fingerprint = _digest(self._info)
        if not lazy:
            _ = self.model  # builds and loads it now

    @functools.cached_property
    def device(self) -> torch.device:
        import torch

        return torch.device(resolve_device(self.spec.device, "embed.device"))

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        import torch

        model = build_model(self.spec)
        if self._checkpoint:
            load_state(model, torch.load(self._checkpoint, map_location="cpu", weights_only=True))
        return model.eval().to(self.device)

    @functools.cached_property  # like device and model: an attribute a subclass (bench/gpu_embed.py) may set
    def preprocess(self) -> Preprocess:
        """PIL image -> [3, 224, 224]: every image this encoder embeds (gallery and queries) goes through it."""
        return preprocess_fn(self.spec.fast_decode)

    @functools.cached_property
    def _autocast_dtype(self) -> torch.dtype:
        import torch

        # bf16 keeps fp32's exponent range (no overflow in 32 blocks); fp16 on GPUs without it
        return (torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported()
                else torch.float16)

    def fingerprint_info(self) -> dict:
        return dict(self._info)

    def _forward(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        import torch

        model = self.model  # built here on first use (before autocast, which needs the device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._autocast_dtype,
                                                    enabled=self.device.type == "cuda"):
            # non_blocking: a pinned batch copies while the launch queue fills; the .cpu() below syncs anyway
            out = model({modality: inputs.to(self.device, non_blocking=True)})[modality]
        # the text postprocessor multiplies by a learnt logit scale, and half precision drifts: renormalise
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] preprocessed images -> [B, D] unit vectors (float32, CPU)."""
        return self._forward("vision", pixels)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """B texts -> [B, D] unit vectors (float32, CPU)."""
        return self._forward("text", tokenize(texts))


def download_checkpoint(dest_dir: Path) -> Path:
    """Fetch Meta's imagebind_huge weights (only on explicit request), atomically, with progress."""
    dest = dest_dir / "imagebind_huge.pth"
    if dest.is_file():  # writes are atomic, so an existing file is a complete one
        return dest
    try:
        with urllib.request.urlopen(CHECKPOINT_URL) as response, disk.atomic_open(dest, "wb") as fh:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise EncoderError(f"download of {CHECKPOINT_URL} failed ({exc}); fetch it elsewhere and set "
                           f"{CHECKPOINT_ENV} to the file") from exc
    return dest
