"""ImageBind-huge image embedding on a CUDA GPU, exact vs fast decode (issue 21 part 6): figures, not assertions.

Builds Meta's imagebind_huge architecture with random weights (no checkpoint: throughput does not
depend on the weights), writes ``--images`` 1024-px photo-like JPEGs, and runs the embed stage's own
path over them as pairs: ``pair_loader`` (DataLoader decode workers, pinned batches) and
``encode_images`` (bf16 autocast, inference mode, unit vectors copied back), once per decode path.

Each of ``--runs`` rounds (default 3) runs both paths, interleaved, over one model; per path it prints the min /
median of the rounds' images/s, the fraction of the GPU's bf16 dense peak the forward reaches, the GPU's
idle time (wall clock minus the forwards' time on CUDA events; the loader wait is the part spent
blocked on decode), and peak GPU memory.  A model-only run (one batch already on the GPU, repeated)
gives the ceiling decode has to keep up with.  The load average before and after is printed and written (decode
runs on the host's cores: other work there slows it).

FLOPs per image (vision tower, multiply-add = 2 FLOPs; d width, L blocks, N = patches + 1 tokens):
    patch conv 2 * P * (3 * kt * kh * kw) * d  +  L * (24 * N * d^2 + 4 * N^2 * d)  +  head 2 * d * out
(24 N d^2: QKV, output projection and the 4x MLP; 4 N^2 d: QK^T and AV).  ViT-H/14 at 224 px
(d 1280, L 32, N 257): 335 GFLOP/image.  The formula is printed beside torch's FlopCounterMode count,
which agrees on the convolution and linear layers; on the CPU it does not see the fused attention
products, so it reads 3% low there (checked with huge's width at 1 and 2 blocks).

    python bench/gpu_embed.py --images 1000 [--runs 3] [--workers 8] [--batch-pairs 64] [--peak-tflops 989]
    python bench/gpu_embed.py --dry-run      # CPU, tiny encoder, 8 images: the same code minus CUDA
Writes bench/results/gpu_embed.json (gpu_embed_dry_run.json for --dry-run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/gpu_embed.py` from the root

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tests.synthetic_photos import write_jpeg  # noqa: E402
from touchvl import disk  # noqa: E402
from touchvl.imagebind.embedding import default_batch_size, default_num_workers, pair_loader  # noqa: E402
from touchvl.imagebind.encoder import EncoderSpec, ImageBindEncoder, build_model  # noqa: E402
from touchvl.imagebind.preprocess import SIZE, preprocess_fn, preprocess_version  # noqa: E402

# nominal dense bf16 tensor-core peaks (vendor datasheets, no sparsity), TFLOP/s; matched on the device name
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10": 125.0}
UNIQUE_PHOTOS = 64  # distinct files rendered; the rest are copies (decode cost is per file, not per content)


class RandomWeightEncoder(ImageBindEncoder):
    """ImageBindEncoder's forward over a model built here with random weights.

    The embed stage refuses imagebind_huge without Meta's checkpoint on purpose (random vectors must not
    pass for real ones), so the bench builds the model itself and keeps every other part of the class.
    """

    def __init__(self, spec: EncoderSpec, device: torch.device):
        self.spec, self.name, self.device = spec, spec.name, device
        try:  # initialise on the GPU: a 1.2 B-parameter random init on the CPU takes minutes
            with torch.device(device):
                model = build_model(spec)
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the slow, certain way
            print(f"building on {device} failed ({type(exc).__name__}: {exc}); building on the CPU")
            model = build_model(spec)
        self.model = model.eval().to(device)
        self.dim = int(spec.config()["out_embed_dim"])
        self.is_smoke = True
        self._info = {"encoder": spec.name, "weights": f"random-seed-{spec.seed}",
                      "preprocess": preprocess_version(spec.fast_decode), "smoke": True}
        self.fingerprint = "bench-random-weights"
        self._autocast_dtype = torch.bfloat16  # autocast is enabled on CUDA only, as in the stage
        self.use_decode(spec.fast_decode)

    def use_decode(self, fast: bool) -> None:
        """Switch the decode path; the model (1.2 B parameters on the GPU) stays, so rounds can interleave."""
        self.preprocess = preprocess_fn(fast)
        self._info["preprocess"] = preprocess_version(fast)


def vision_flops_per_image(config: dict, image_size: int = SIZE) -> float:
    """The module docstring's formula, from the encoder config."""
    d, blocks, out = config["vision_embed_dim"], config["vision_num_blocks"], config["out_embed_dim"]
    kt, kh, kw = config.get("kernel_size", (2, 14, 14))
    patches = (image_size // kh) * (image_size // kw)  # PadIm2Video repeats the image to kt frames: one time step
    tokens = patches + 1  # + CLS
    return 2 * patches * 3 * kt * kh * kw * d + blocks * (24 * tokens * d * d + 4 * tokens * tokens * d) + 2 * d * out


def counted_flops_per_image(encoder: ImageBindEncoder) -> float:
    pixels = torch.zeros(1, 3, SIZE, SIZE, device=encoder.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder.model({"vision": pixels})
    return float(counter.get_total_flops())


def write_photos(folder: Path, n: int, jobs: int) -> list[Path]:
    unique = min(n, UNIQUE_PHOTOS)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        firsts = list(pool.map(write_jpeg, [folder / f"photo_{i}.jpg" for i in range(unique)],
                               [1024] * unique, [1024] * unique, range(unique)))
    paths = list(firsts)
    for i in range(unique, n):
        paths.append(folder / f"photo_{i}.jpg")
        shutil.copyfile(firsts[i % unique], paths[-1])
    return paths


class Clock:
    """Elapsed seconds of a span on the GPU's timeline (CUDA events) or, on the CPU, the host's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, begun) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.spans.append((begun, event))
        else:
            self.spans.append(time.perf_counter() - begun)

    def total_s(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        return sum(self.spans)


def run_path(encoder: ImageBindEncoder, paths: list[Path], batch_pairs: int, workers: int, flops: float,
             peak: float | None) -> dict:
    """One pass of the embed stage's loop over ``paths`` (as pairs), timed; the first batch is warm-up."""
    rows = [(i, str(paths[2 * i]), str(paths[2 * i + 1])) for i in range(len(paths) // 2)]
    loader = pair_loader(rows, encoder.preprocess, batch_pairs, workers, pin_memory=encoder.device.type == "cuda")
    cuda = encoder.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock, wait_s, images, warm, errors = Clock(encoder.device), 0.0, 0, None, 0
    start = steady = time.perf_counter()
    batches = iter(loader)
    while True:
        asked = time.perf_counter()
        try:
            uids, pixels, failed = next(batches)
        except StopIteration:
            break
        errors += len(failed)
        if warm is None:  # worker start-up and the first decode: reported, not in the rates
            warm = time.perf_counter() - start
            encoder.encode_images(pixels)
            steady = time.perf_counter()
            continue
        wait_s += time.perf_counter() - asked
        begun = clock.start()
        encoder.encode_images(pixels)  # ends in .cpu(): synchronous, as in the embed stage
        clock.stop(begun)
        images += pixels.shape[0]
    wall = time.perf_counter() - steady
    gpu_s = clock.total_s()
    out = {"images_timed": images, "first_batch_s": round(warm, 3), "wall_s": round(wall, 3),
           "images_per_s": round(images / wall, 1) if wall else None, "forward_s": round(gpu_s, 3),
           "loader_wait_s": round(wait_s, 3), "gpu_idle_s": round(wall - gpu_s, 3),
           "gpu_idle_fraction": round(1 - gpu_s / wall, 3) if wall else None, "decode_errors": errors,
           "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    if peak and wall:
        out["fraction_of_bf16_peak"] = round(images * flops / wall / (peak * 1e12), 3)
        out["forward_fraction_of_bf16_peak"] = round(images * flops / gpu_s / (peak * 1e12), 3) if gpu_s else None
    return out


def model_only(encoder: ImageBindEncoder, batch_images: int, flops: float, peak: float | None, steps: int) -> dict:
    """The GPU-bound ceiling: one batch already on the device, forward only (still autocast + unit vectors)."""
    pixels = torch.randn(batch_images, 3, SIZE, SIZE, device=encoder.device)
    encoder.encode_images(pixels)
    clock = Clock(encoder.device)
    for _ in range(steps):
        begun = clock.start()
        encoder.encode_images(pixels)
        clock.stop(begun)
    seconds = clock.total_s()
    out = {"images_per_s": round(steps * batch_images / seconds, 1)}
    if peak:
        out["fraction_of_bf16_peak"] = round(steps * batch_images * flops / seconds / (peak * 1e12), 3)
    return out


def summarise(rounds: list[dict]) -> dict:
    """One path's rounds: the min and median of each figure (images/s: the max is the best), and every round."""
    out: dict = {"runs": rounds}
    for key, value in rounds[0].items():
        values = [r[key] for r in rounds]
        if key == "decode_errors":
            out[key] = max(values)
        elif isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
            out[key] = {"min": min(values), "median": round(statistics.median(values), 3), "max": max(values)}
        else:  # None where it does not apply (no CUDA, no known peak); every round's where they differ
            out[key] = value if all(v == value for v in values) else values
    return out


def bf16_peak(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds of both decode paths (at least 3)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: the embed stage's)")
    ap.add_argument("--batch-pairs", type=int, default=None, help="pairs per forward (default: the stage's, 64)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak if the GPU is not in the table")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny encoder, 8 images: check the code, not the GPU")
    ap.add_argument("--out", type=Path, default=None, help="report file (default: bench/results/gpu_embed*.json)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1 (3 or more for a figure)")
    if args.dry_run:
        device, spec, args.images = torch.device("cpu"), EncoderSpec(name="imagebind_tiny", device="cpu"), 8
        args.workers = 2 if args.workers is None else args.workers
        args.batch_pairs = args.batch_pairs or 2
        name = "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu_embed.py: no CUDA GPU here (torch.cuda.is_available() is False); "
                     "use --dry-run to check the code on the CPU")
        device, spec = torch.device("cuda"), EncoderSpec(name="imagebind_huge", device="cuda")
        name = torch.cuda.get_device_name()
    workers = default_num_workers(device) if args.workers is None else args.workers
    batch_pairs = args.batch_pairs or default_batch_size(device)
    peak = None if args.dry_run else bf16_peak(name, args.peak_tflops)
    flops = vision_flops_per_image(spec.config())
    report = {"device": name, "encoder": spec.name, "images": args.images, "runs": args.runs, "workers": workers,
              "batch_images": 2 * batch_pairs, "bf16_peak_tflops": peak, "gflops_per_image_formula": round(flops / 1e9, 2)}
    report["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    print(f"{name}: {spec.name} random weights, {args.images} 1024-px JPEGs, {workers} decode workers, "
          f"{2 * batch_pairs} images a forward, bf16 peak {peak or 'unknown'} TFLOP/s, {args.runs} rounds; "
          f"load average {report['load_average_before']}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.images, jobs=max(1, min(16, os.cpu_count() or 1)))
        encoder = RandomWeightEncoder(spec, device)
        report["gflops_per_image_counted"] = round(counted_flops_per_image(encoder) / 1e9, 2)
        report["model_only"] = model_only(encoder, 2 * batch_pairs, flops, peak, 2 if args.dry_run else 10)
        rounds: dict[str, list[dict]] = {"exact": [], "fast": []}
        for _ in range(args.runs):
            for path in ("exact", "fast"):
                encoder.use_decode(path == "fast")
                rounds[path].append(run_path(encoder, paths, batch_pairs, workers, flops, peak))
        for path, runs in rounds.items():
            report[path] = summarise(runs)
    report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    out = args.out or Path(__file__).parent / "results" / ("gpu_embed_dry_run.json" if args.dry_run else "gpu_embed.json")
    disk.write_json(out, report)
    print(f"GFLOP/image: formula {report['gflops_per_image_formula']}, FlopCounterMode {report['gflops_per_image_counted']}")
    print(f"model only: {report['model_only']}")
    for path in ("exact", "fast"):
        r = report[path]
        med = {key: (value["median"] if isinstance(value, dict) else value) for key, value in r.items()}
        print(f"{path:5s}: {r['images_per_s']['min']} / {med['images_per_s']} images/s (min / median of "
              f"{args.runs}), median GPU idle {med['gpu_idle_s']} s of {med['wall_s']} s "
              f"({med['gpu_idle_fraction']}; loader wait {med['loader_wait_s']} s), "
              f"{med.get('fraction_of_bf16_peak', 'n/a')} of bf16 peak, peak memory "
              f"{med['peak_gpu_memory_gib']} GiB, first batch {med['first_batch_s']} s, decode errors {r['decode_errors']}")
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}")
    print(f"-> {out}")
    failed = {path: report[path]["decode_errors"] for path in ("exact", "fast") if report[path]["decode_errors"]}
    if failed:  # the rates would be of fewer images than written: the report stays, the run fails
        sys.exit(f"bench/gpu_embed.py: images that did not decode (per round, by path): {failed}")
    return report


if __name__ == "__main__":
    main()
