#!/usr/bin/env bash
# The whole pipeline on synthetic data in the MGSV-EC layout, on the CPU, in minutes:
#   synthetic data -> short training of MaDe with each moment head -> test of the best
#   checkpoints -> the models vs baselines, overall and on tracks seen / unseen in training.
# The track_prior baseline only knows how each training track is used (its canonical clip);
# it reads no feature. See docs/demo-data.md for what the synthetic data models.
# Usage: bash scripts/demo.sh            (outputs go to ./demo_out; DEMO_OUT=... to change)
#        DEMO_HEADS=detr bash scripts/demo.sh   (only the paper's detector; default: detr boundary)
#        DEMO_DATA_ARGS="--seed 7 --canonical_share 0" bash scripts/demo.sh   (other synthetic data:
#            flags of scripts/make_demo_data.py)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUT:-./demo_out}
EPOCHS=${DEMO_EPOCHS:-6}
DEVICE=${DEMO_DEVICE:-auto}
HEADS=${DEMO_HEADS:-detr boundary}
DATA_ARGS=${DEMO_DATA_ARGS:-}
DATA="${OUT}/dataset/MGSV-EC"
FEATURES="${OUT}/features/Kuai_feature"

echo "== 1/4 synthetic MGSV-EC data in ${OUT}"
# shellcheck disable=SC2086  # DATA_ARGS is a list of flags
python scripts/make_demo_data.py --out "${OUT}" --overwrite ${DATA_ARGS}

names=()
for head in ${HEADS}; do
    name=$([ "${head}" = detr ] && echo MaDe || echo "MaDe-${head}")
    echo "== 2/4 training ${name} (--moment_head ${head}, ${EPOCHS} epochs, batch 64)"
    # Paper configuration except the budget (batch 64 instead of 512, 2,000 training videos,
    # a handful of epochs instead of 100) and, for 'boundary', the moment head.
    python train.py --do_train --do_eval --name "demo-${head}" --output_dir "${OUT}/logs" --overwrite \
        --train_csv "${DATA}/train_data.csv" --val_csv "${DATA}/val_data.csv" \
        --frozen_feature_path "${FEATURES}" --device "${DEVICE}" --moment_head "${head}" \
        --epochs "${EPOCHS}" --batch_size_train 64 --batch_size_val 40 --num_workers 0
    RUN=$(ls -td "${OUT}"/logs/*/*+"demo-${head}" | head -n 1)
    echo "== 3/4 testing ${RUN}/pytorch_model.bin.best_r1 on the test split"
    python test.py --load_uni_model_path "${RUN}/pytorch_model.bin.best_r1" \
        --test_csv "${DATA}/test_data.csv" --frozen_feature_path "${FEATURES}" --device "${DEVICE}" \
        --num_workers 0 --prior_csv "${DATA}/train_data.csv" --metrics_json "${OUT}/metrics_${name}.json"
    names+=("${name}")
    [ -f "${OUT}/metrics_${name}_with_prior.json" ] && names+=("${name}_with_prior")
done

echo "== 4/4 baselines on the same split"
for b in start0 center random track_prior; do
    python -m utils.evaluate --gt_csv "${DATA}/test_data.csv" --baseline "$b" \
        --prior_csv "${DATA}/train_data.csv" --metrics_json "${OUT}/metrics_${b}.json" > /dev/null
done
python - "${OUT}" "${names[@]}" start0 center random track_prior <<'PY'
import json, sys
from utils.evaluate.metrics import METRIC_KEYS, format_table
from utils.evaluate.track_prior import SUBSETS
out, names = sys.argv[1], sys.argv[2:]
table = {n.replace("_with_prior", "+prior"): json.load(open(f"{out}/metrics_{n}.json")) for n in names}
print("\nTest split of the synthetic data (R@k and IoU@k in %, mIoU as a fraction; '+prior': the\n"
      "boundary head decoded together with each track's usage in training):\n")
print(format_table(table, columns=METRIC_KEYS))
n = {s: int(next(iter(table.values())).get(f"{s}/n", 0)) for s in SUBSETS}
print("\nSmG mIoU by how the track is used in training: seen / unseen track, and (seen tracks)\n"
      "moment on / off the track's canonical start (videos in brackets):\n")
print(format_table({k: {f"mIoU {s} ({n[s]})": v.get(f"{s}/mIoU") for s in SUBSETS} for k, v in table.items()}))
PY

# The grounding page (scripts/app.py --demo): an index of the test split's tracks, and synthesised
# audio/video for a few test queries and the tracks the model returns for them, so that its
# players and its preview button have media to work with.
# The last model trained (the boundary head with the default DEMO_HEADS); the index keeps each
# track's canonical clip in the training CSV, which the page shows beside the model's moment.
APP_RUN=$(ls -td "${OUT}"/logs/*/*+demo-* | head -n 1)
echo "== grounding page: music index and demo media"
python scripts/build_music_index.py --load_uni_model_path "${APP_RUN}/pytorch_model.bin.best_r1" \
    --frozen_feature_path "${FEATURES}" --music_ids "${DATA}/test_data.csv" --out "${OUT}/music.index" \
    --prior_csv "${DATA}/train_data.csv" --device "${DEVICE}" --overwrite --quiet
python scripts/make_demo_media.py --demo "${OUT}" --queries 6 --topk 5 \
    --load_uni_model_path "${APP_RUN}/pytorch_model.bin.best_r1" --index "${OUT}/music.index"
echo "Try it in a browser: python scripts/app.py --demo ${OUT}   (then open http://127.0.0.1:7860)"
