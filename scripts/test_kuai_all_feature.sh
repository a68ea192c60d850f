#!/usr/bin/env bash
# Evaluate the best checkpoints of a training run on the MGSV-EC test split
# (the authors' test_kuai_all_feature.sh, written out flag by flag).
# Usage: bash scripts/test_kuai_all_feature.sh [GPU_ID] RUN_DIR_OR_CHECKPOINT [extra flags...]
#   RUN_DIR is e.g. ./logs/kuai50k_uni/1125+MaDe[...] (note the <MMDD>+ prefix train.py adds).
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_ID=${1:-0}
CKPT=${2:?usage: bash scripts/test_kuai_all_feature.sh GPU_ID RUN_DIR_OR_CHECKPOINT [flags]}
shift 2
export CUDA_VISIBLE_DEVICES=${GPU_ID}

python test.py \
    --do_eval \
    --name MaDe-test \
    --load_uni_model_path "${CKPT}" \
    --test_best 1 \
    --test_data kuai50k \
    --test_csv ./dataset/MGSV-EC/test_data.csv \
    --frozen_feature_path ./features/Kuai_feature \
    --max_v_frames 50 --max_m_duration 240 --stride 2.5 --filter 10 --padding 0 \
    --batch_size_val 40 --num_workers 8 \
    --save_model 0 --save_json 1 \
    "$@"
