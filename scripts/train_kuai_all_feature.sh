#!/usr/bin/env bash
# Train MaDe on MGSV-EC with the paper's settings (the authors' train_kuai_all_feature.sh,
# written out flag by flag). Usage: bash scripts/train_kuai_all_feature.sh [GPU_ID] [extra flags...]
# Expects dataset/MGSV-EC/{train,val}_data.csv and features/Kuai_feature/ (see their README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_ID=${1:-0}; shift || true
export CUDA_VISIBLE_DEVICES=${GPU_ID}

DATA=kuai50k
FEATURES=./features/Kuai_feature
STRIDE=2.5
MAX_M_DURATION=240
MAX_V_FRAMES=50
FILTER=10
BATCH=512
EPOCHS=100
LR=3e-4
WARMUP=0.02
TEMP=3e-2
VMR_FUSION=XA-music
VMR_LOSS=dual_single_loss_fuse
MML_FUSION=concat
ENC_LAYERS=2
DEC_LAYERS=6
QUERIES=1
NAME="MaDe[${VMR_FUSION}][${VMR_LOSS}][${MML_FUSION}][enc${ENC_LAYERS}dec${DEC_LAYERS}q${QUERIES}][bs${BATCH}lr${LR}wu${WARMUP}t${TEMP}][s${STRIDE}f${FILTER}]"

python train.py \
    --do_train --do_eval \
    --name "${NAME}" \
    --output_dir ./logs \
    --train_data ${DATA} --val_data ${DATA} \
    --train_csv ./dataset/MGSV-EC/train_data.csv \
    --val_csv ./dataset/MGSV-EC/val_data.csv \
    --frozen_feature_path ${FEATURES} \
    --max_v_frames ${MAX_V_FRAMES} --max_m_duration ${MAX_M_DURATION} \
    --stride ${STRIDE} --filter ${FILTER} --padding 0 \
    --dim_input 256 \
    --video_encoder_type ViT --audio_encoder_type AST \
    --temperature_init_value ${TEMP} \
    --video_transformer_depth 1 --audio_transformer_depth 1 \
    --with_cls_token 0 --with_act_after_proj 0 --transformer_is_share 0 \
    --SA_temporal_heads 8 --agg_module transf \
    --vmr_fusion ${VMR_FUSION} --vmr_loss ${VMR_LOSS} \
    --dual_single_loss_weight 1.0 --fusion_mask 1 \
    --mml_fusion ${MML_FUSION} --mml_localization detr \
    --moment_query_type video \
    --detr_enc_layers ${ENC_LAYERS} --detr_dec_layers ${DEC_LAYERS} \
    --num_moment_queries ${QUERIES} --decoder_SA 0 --predict_center 0 \
    --l1_loss 1 --aux_loss 1 --contrastive_align_loss 1 --audio_short_cut 0 \
    --ret_loss_weight 1.0 --loc_loss_weight 1.0 \
    --epochs ${EPOCHS} --batch_size_train ${BATCH} --batch_size_val 40 \
    --num_workers 8 \
    --matching_lr ${LR} --detection_lr ${LR} \
    --scheduler warmupcosine --warmup_rate ${WARMUP} --lr_update_rate 40 --decay_rate 0.9 \
    --distance_type COS \
    --num_display 10 --tb_writer 1 --save_model 1 \
    "$@"
