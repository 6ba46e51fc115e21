"""LoRA and QLoRA throughput of the local trainer on a GPU (figures, not assertions).

Runs ``--steps`` optimizer steps of touchvl's local trainer (``transformers.Trainer``) per mode (``lora``: quantization none;
``qlora``: quantization 4bit through bitsandbytes) on synthetic image chats and prints tokens/s (non-padding input tokens)
and peak GPU memory, with the min / median of the steps' own rates (each step timed on its own, the first left
out as warm-up) and the load average before and after.  ``--base`` is a local model folder (e.g. a downloaded SmolVLM-256M-Instruct);
without it a random-weight LLaVA is built offline (the tiny one: tests the path, small for a GPU).

    python -m bench.finetune_gpu [--base DIR] [--steps 30] [--modes lora qlora] [--device cuda] [--out FILE]
Writes bench/results/finetune_gpu.json.  ``--device cpu --modes lora`` runs the same code without a GPU (tested).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from touchvl import disk
from touchvl.errors import StageError
from touchvl.finetune.local.data import load_examples
from touchvl.finetune.local.tiny import build_tiny_vlm, dataset_texts
from touchvl.finetune.local.trainer import Events, Layout, LocalTrainer, read_events
from touchvl.params import LocalFinetuneParams
from tests.finetune_local_fixtures import write_image_dataset


def run_mode(mode: str, base: str, train, steps: int, device: str, work: Path) -> dict:
    from transformers import TrainerCallback

    cfg = LocalFinetuneParams(base_model=base, device=device, quantization="4bit" if mode == "qlora" else "none",
                              batch_size=4, max_steps=steps, lora_r=16, lora_alpha=32, max_length=512,
                              epochs=math.ceil(steps * 4 / len(train)),  # enough epochs for every step asked
                              checkpoint_every=10 * steps)  # the final checkpoint only
    lay = Layout(work / mode)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = LocalTrainer(cfg, 0, base, train, train[:4], lay, mode, "bench", Events(lay.events, mode))
    ends: list[tuple[float, int]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append((time.perf_counter(), state.num_input_tokens_seen))

    t.hf.add_callback(StepClock())
    t.run(lambda: False)
    # timed from the end of step 1 (kernels, allocator warmed up) to the end of the last step
    (t0, n0), (t1, n1) = ends[0], ends[-1]
    step_rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(ends, ends[1:])]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    loss = [e["data"]["train_loss"] for e in read_events(lay.events) if "train_loss" in (e.get("data") or {})]
    del t
    if len(ends) != steps:  # a figure for fewer steps than asked would be mislabelled
        raise StageError(f"{mode}: {len(ends)} optimizer steps ran, {steps} were asked")
    return {"mode": mode, "steps": steps, "tokens_per_s": round((n1 - n0) / (t1 - t0), 1), "seconds": round(t1 - t0, 2),
            "step_tokens_per_s": {"min": round(min(step_rates), 1), "median": round(statistics.median(step_rates), 1),
                                  "steps_timed": len(step_rates)},
            "peak_gpu_gib": None if peak is None else round(peak, 2), "first_loss": loss[0], "last_loss": loss[-1]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="local model folder; default: random-weight tiny LLaVA")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per mode (at least 4: 3 timed)")
    ap.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune_gpu.json")
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error("--steps must be at least 4 (the first step is warm-up; 3 or more are timed)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/finetune_gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); "
                 "use --device cpu --modes lora to check the code on the CPU")
    if "qlora" in args.modes and args.device != "cuda":  # before any work; the trainer would say the same later
        sys.exit("bench/finetune_gpu.py: qlora (bitsandbytes 4-bit) needs a CUDA GPU; on the CPU use --modes lora")
    load_before = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_image_dataset(work / "train.jsonl", args.examples)
        base = args.base or str(build_tiny_vlm(work / "base", dataset_texts(data)))
        train = load_examples(data)
        try:
            rows = [run_mode(m, base, train, args.steps, args.device, work) for m in args.modes]
        except StageError as exc:  # e.g. QLoRA without CUDA: the trainer's own one-line reason
            sys.exit(f"bench/finetune_gpu.py: {exc}")
    out = {"base": args.base or "tiny-random-llava", "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "rows": rows,
           "load_average_before": load_before, "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    disk.write_json(args.out, out)
    for r in rows:
        step = r["step_tokens_per_s"]
        print(f"{r['mode']:6s} {r['tokens_per_s']:>10} tokens/s (non-padding; per step min {step['min']}, median "
              f"{step['median']} of {step['steps_timed']})  peak {r['peak_gpu_gib']} GiB  ({r['steps']} steps, "
              f"{r['seconds']} s; loss {r['first_loss']:.3f} -> {r['last_loss']:.3f})")
    print(f"load average before {out['load_average_before']}, after {out['load_average_after']}  -> {args.out}")
    return out


if __name__ == "__main__":
    main()
