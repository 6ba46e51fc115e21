"""LoRA and QLoRA throughput of the local trainer on a GPU (figures, not assertions).

Runs ``--steps`` optimizer steps of touchvl's local trainer (``transformers.Trainer``) per mode (``lora``: quantization none;
``qlora``: quantization 4bit through bitsandbytes) on synthetic image chats and prints tokens/s (non-padding input tokens)
and peak GPU memory.  ``--base`` is a local model folder (e.g. a downloaded SmolVLM-256M-Instruct);
without it a random-weight LLaVA is built offline (the tiny one: tests the path, small for a GPU).

    python -m bench.finetune_gpu [--base DIR] [--steps 30] [--modes lora qlora] [--device cuda]
Writes bench/results/finetune_gpu.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from touchvl import disk
from touchvl.finetune.local.data import load_examples
from touchvl.finetune.local.tiny import build_tiny_vlm, dataset_texts
from touchvl.finetune.local.trainer import Events, Layout, LocalTrainer, read_events
from touchvl.params import LocalFinetuneParams
from tests.finetune_local_fixtures import write_image_dataset


def run_mode(mode: str, base: str, train, steps: int, device: str, work: Path) -> dict:
    from transformers import TrainerCallback

    cfg = LocalFinetuneParams(base_model=base, device=device, quantization="4bit" if mode == "qlora" else "none",
                              batch_size=4, max_steps=steps, lora_r=16, lora_alpha=32, max_length=512,
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
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    loss = [e["data"]["train_loss"] for e in read_events(lay.events) if "train_loss" in (e.get("data") or {})]
    del t
    return {"mode": mode, "steps": steps, "tokens_per_s": round((n1 - n0) / (t1 - t0), 1), "seconds": round(t1 - t0, 2),
            "peak_gpu_gib": None if peak is None else round(peak, 2), "first_loss": loss[0], "last_loss": loss[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="local model folder; default: random-weight tiny LLaVA")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--examples", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_image_dataset(work / "train.jsonl", args.examples)
        base = args.base or str(build_tiny_vlm(work / "base", dataset_texts(data)))
        train = load_examples(data)
        rows = [run_mode(m, base, train, args.steps, args.device, work) for m in args.modes]
    out = {"base": args.base or "tiny-random-llava", "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "rows": rows}
    disk.write_json(Path("bench/results/finetune_gpu.json"), out)
    for r in rows:
        print(f"{r['mode']:6s} {r['tokens_per_s']:>10} tokens/s (non-padding)  peak {r['peak_gpu_gib']} GiB  "
              f"({r['steps']} steps, {r['seconds']} s)")


if __name__ == "__main__":
    main()
