#!/usr/bin/env bash
# The whole pipeline on synthetic data in the MGSV-EC layout, on the CPU, in minutes:
#   synthetic data -> short training -> test of the best checkpoint -> model vs baselines,
#   overall and on tracks seen / unseen in training (the track_prior baseline only knows how
#   each training track is used; it reads no feature).
# Usage: bash scripts/demo.sh            (outputs go to ./demo_out; DEMO_OUT=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUT:-./demo_out}
EPOCHS=${DEMO_EPOCHS:-6}
DEVICE=${DEMO_DEVICE:-auto}
DATA="${OUT}/dataset/MGSV-EC"
FEATURES="${OUT}/features/Kuai_feature"

echo "== 1/4 synthetic MGSV-EC data in ${OUT}"
python scripts/make_demo_data.py --out "${OUT}" --overwrite

echo "== 2/4 training MaDe (${EPOCHS} epochs, paper architecture, batch 64)"
# Paper configuration except the budget: batch 64 instead of 512 (2,000 training videos)
# and a handful of epochs instead of 100.
python train.py --do_train --do_eval --name demo --output_dir "${OUT}/logs" --overwrite \
    --train_csv "${DATA}/train_data.csv" --val_csv "${DATA}/val_data.csv" \
    --frozen_feature_path "${FEATURES}" --device "${DEVICE}" \
    --epochs "${EPOCHS}" --batch_size_train 64 --batch_size_val 40 --num_workers 0

RUN=$(ls -td "${OUT}"/logs/*/*+demo | head -n 1)

echo "== 3/4 testing ${RUN}/pytorch_model.bin.best_r1 on the test split"
python test.py --load_uni_model_path "${RUN}/pytorch_model.bin.best_r1" \
    --test_csv "${DATA}/test_data.csv" --frozen_feature_path "${FEATURES}" --device "${DEVICE}" \
    --num_workers 0 --metrics_json "${OUT}/metrics_MaDe.json"

echo "== 4/4 baselines on the same split"
for b in start0 center random track_prior; do
    python -m utils.evaluate --gt_csv "${DATA}/test_data.csv" --baseline "$b" \
        --prior_csv "${DATA}/train_data.csv" --metrics_json "${OUT}/metrics_${b}.json" > /dev/null
done
python - "${OUT}" <<'PY'
import json, sys
from utils.metrics import METRIC_KEYS, format_table
from utils.track_prior import SUBSETS
out = sys.argv[1]
names = ["MaDe", "start0", "center", "random", "track_prior"]
table = {n: json.load(open(f"{out}/metrics_{n}.json")) for n in names}
print("\nTest split of the synthetic data (R@k and IoU@k in %, mIoU as a fraction):\n")
print(format_table(table, columns=METRIC_KEYS))
n = {s: int(table["MaDe"].get(f"{s}/n", 0)) for s in SUBSETS}
print("\nSmG mIoU by how the track is used in training: seen / unseen track, and (seen tracks)"
      "\nmoment on / off the track's canonical start (videos in brackets):\n")
print(format_table({k: {f"{s} ({n[s]})": v.get(f"{s}/mIoU") for s in SUBSETS} for k, v in table.items()}))
PY
