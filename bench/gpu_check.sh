#!/usr/bin/env bash
# GPU figures in one run (issue 20 part 4): a 30-step LoRA and QLoRA job of the local trainer and, when
# bench/gpu_embed.py exists (issue 21), the ImageBind embedding of 1,000 images.  Prints tokens/s, images/s
# and peak GPU memory; results in bench/results/.  Needs a CUDA GPU and bitsandbytes (requirements.txt).
#   bash bench/gpu_check.sh [--base DIR]     # DIR: a local small VLM folder; default a random-weight LLaVA
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu_check.sh: no CUDA GPU here')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "== local trainer: LoRA and QLoRA, 30 steps"
PYTHONPATH=$PWD "$PY" -m bench.finetune_gpu --steps 30 --modes lora qlora --device cuda "$@"
if [ -f bench/gpu_embed.py ]; then
  echo "== ImageBind embedding, 1,000 images"
  PYTHONPATH=$PWD "$PY" bench/gpu_embed.py --images 1000
else
  echo "== bench/gpu_embed.py not present: ImageBind embedding skipped"
fi
