#!/usr/bin/env bash
# The whole pipeline on synthetic data in the MGSV-EC layout, on the CPU, in minutes:
#   synthetic data -> short training -> test of the best checkpoint -> model vs trivial baselines.
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

echo "== 4/4 trivial baselines on the same split"
for b in start0 center random; do
    python -m utils.evaluate --gt_csv "${DATA}/test_data.csv" --baseline "$b" \
        --metrics_json "${OUT}/metrics_${b}.json" > /dev/null
done
python - "${OUT}" <<'PY'
import json, sys
from utils.metrics import format_table
out = sys.argv[1]
names = ["MaDe", "start0", "center", "random"]
table = {n: json.load(open(f"{out}/metrics_{n}.json")) for n in names}
print("\nTest split of the synthetic data (R@k and IoU@k in %, mIoU as a fraction):\n")
print(format_table(table))
PY

# The grounding page (scripts/app.py --demo): an index of the test split's tracks, and synthesised
# audio/video for a few test queries and the tracks the model returns for them, so that its
# players and its preview button have media to work with.
APP_RUN=$(ls -td "${OUT}"/logs/*/*+demo | head -n 1)
echo "== grounding page: music index and demo media"
python scripts/build_music_index.py --load_uni_model_path "${APP_RUN}/pytorch_model.bin.best_r1" \
    --frozen_feature_path "${FEATURES}" --music_ids "${DATA}/test_data.csv" --out "${OUT}/music.index" \
    --device "${DEVICE}" --overwrite --quiet
python scripts/make_demo_media.py --demo "${OUT}" --queries 6 --topk 5 \
    --load_uni_model_path "${APP_RUN}/pytorch_model.bin.best_r1" --index "${OUT}/music.index"
echo "Try it in a browser: python scripts/app.py --demo ${OUT}   (then open http://127.0.0.1:7860)"
