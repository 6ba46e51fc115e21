#!/usr/bin/env bash
# GPU figures in one run (issue 20 part 4): a 30-step LoRA and QLoRA job of the local trainer and (issue 21)
# the ImageBind embedding of 1,000 images.  Prints tokens/s, images/s
# and peak GPU memory; results in bench/results/.  Needs a CUDA GPU and bitsandbytes (requirements.txt).
#   bash bench/gpu_check.sh [--base DIR]     # DIR: a local small VLM folder; default a random-weight LLaVA
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then  # the project's venv (make install) where there is one, else the machine's python3
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') else 'bench/gpu_check.sh: $PY has no torch (make install, or PY=...)')"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu_check.sh: no CUDA GPU here')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# each part runs even when the one before failed (a GPU lease is short: one broken part must not cost the
# other's figures); the script fails at the end, naming what failed
failed=()
echo "== local trainer: LoRA and QLoRA, 30 steps"
PYTHONPATH=$PWD "$PY" -m bench.finetune_gpu --steps 30 --modes lora qlora --device cuda "$@" || failed+=(finetune_gpu)
echo "== ImageBind embedding, 1,000 images, 3 interleaved rounds of exact and fast decode"
PYTHONPATH=$PWD "$PY" bench/gpu_embed.py --images 1000 --runs 3 || failed+=(gpu_embed)
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench/gpu_check.sh: failed: ${failed[*]}" >&2
  exit 1
fi
