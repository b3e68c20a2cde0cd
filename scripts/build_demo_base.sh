#!/usr/bin/env bash
# Rebuild model/demo/, the small demo base that ships with the repo, with the repo's own pipeline:
#   demo corpus -> tokenizer -> pretrain -> full SFT -> fp16 copy into model/demo/.
# About 5 minutes on one GPU; it also runs on a CPU (--device cpu), just far slower.
#   bash scripts/build_demo_base.sh              # writes the runs to out/demo_build/, then model/demo/
#   bash scripts/build_demo_base.sh --device cpu # any extra flags go to both training runs
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${DEMO_BUILD_DIR:-out/demo_build}

python dataset/make_demo_data.py
python trainer/train_tokenizer.py --out_dir model/tokenizer
# A minimind-3 layout (q/k norm; exports to Qwen3), 256 wide and 6 deep: ~6M parameters, small enough to
# ship (fp16, < 20 MB) and to LoRA-train on a laptop CPU in minutes.
python trainer/train_pretrain.py --hidden_size 256 --num_hidden_layers 6 --save_dir "$runs" \
    --epochs 12 --packing --packed_rows 32 --max_seq_len 512 --batch_size 32 --learning_rate 2e-3 --warmup_iters 100 \
    --log_interval 100 --save_interval 100000 "$@"
python trainer/train_full_sft.py --from_weight "$runs/pretrain_256" --save_dir "$runs" \
    --epochs 6 --max_seq_len 512 --batch_size 32 --learning_rate 5e-4 --warmup_iters 50 \
    --log_interval 100 --save_interval 100000 "$@"

python - "$runs/full_sft_256" model/demo <<'PY'
"""Copy the SFT model directory into model/demo/ in fp16 (half the bytes; training reloads it in fp32)."""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model.model_minimind  # noqa: F401  (registers MiniMind with transformers)

src, dst = sys.argv[1], sys.argv[2]
AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(torch.float16).save_pretrained(dst)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
print(f"wrote {dst}")
PY
