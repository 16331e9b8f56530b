#!/usr/bin/env bash
# Fine-tune one CLIP vision expert per task with the `clip_finetune` method (full, LoRA or L-LoRA), then
# merge them like any other pool. By default it runs on the built-in offline mini benchmark (no download);
# BENCH=hub fine-tunes the hub's CLIP on the eight tasks of the task-arithmetic benchmark.
#
#   examples/clip_finetune/clip_finetune.sh                          # mini benchmark, full fine-tuning
#   VARIANT=lora examples/clip_finetune/clip_finetune.sh             # LoRA (q_proj/v_proj, r 16) adapters
#   BENCH=hub ARCH=clip-vit-base-patch16 VARIANT=l_lora examples/clip_finetune/clip_finetune.sh
#   TASKS="scenes signs" STEPS=10 examples/clip_finetune/clip_finetune.sh fast_dev_run=true   # a quick try
#
# Variables: BENCH (mini | hub), VARIANT (full | lora | l_lora), ARCH (hub: clip-vit-base-patch32,
# clip-vit-base-patch16, clip-vit-large-patch14), TASKS (default: all eight), STEPS / BATCH / LR (default:
# the mini experts' recipe on the mini benchmark, 400 steps x 32 images, lr 1e-4; on the hub the method
# config's: lr 1e-5, batch 32, 4000 steps full, 2000 LoRA / L-LoRA), OUT (default outputs/clip_finetune),
# PYTHON (default python). Extra arguments go to every run (Hydra overrides).
# Each expert goes to $OUT/<pool>_<variant>/<task> (a model folder, or a peft adapter folder for LoRA / L-LoRA),
# with its report next to it. The hub's L-LoRA pool (modelpool=CLIPVisionModelPool/clip-vit-base-patch16_TA8_l_lora)
# reads them from FUSION_BENCH_L_LORA_DIR=$OUT/clip-vit-base-patch16_l_lora.
set -euo pipefail

BENCH=${BENCH:-mini}
VARIANT=${VARIANT:-full}
ARCH=${ARCH:-clip-vit-base-patch16}
OUT=${OUT:-outputs/clip_finetune}
PYTHON=${PYTHON:-python}

case "$VARIANT" in
  full) METHOD=clip_finetune ;;
  lora|l_lora) METHOD=clip_finetune_$VARIANT ;;
  *) echo "clip_finetune.sh: error: VARIANT must be full, lora or l_lora; got '$VARIANT'" >&2; exit 2 ;;
esac
case "$BENCH" in
  mini)
    POOL=mini-clip
    DEFAULT_TASKS="scenes vehicles aerial landcover house_numbers signs handwritten textures"
    STEPS=${STEPS:-400}; BATCH=${BATCH:-32}; LR=${LR:-1e-4} ;;
  hub)
    POOL=$ARCH
    DEFAULT_TASKS="sun397 stanford_cars resisc45 eurosat svhn gtsrb mnist dtd" ;;
  *) echo "clip_finetune.sh: error: BENCH must be mini or hub; got '$BENCH'" >&2; exit 2 ;;
esac
TASKS=${TASKS:-$DEFAULT_TASKS}

OPTIONS=()
[ -n "${STEPS:-}" ] && OPTIONS+=("method.num_steps=$STEPS")
[ -n "${BATCH:-}" ] && OPTIONS+=("method.batch_size=$BATCH")
[ -n "${LR:-}" ] && OPTIONS+=("method.learning_rate=$LR")

for task in $TASKS; do
  dest="$OUT/${POOL}_${VARIANT}/$task"
  echo "== $METHOD on $task -> $dest" >&2
  "$PYTHON" -m fusion_bench \
    method="$METHOD" method.task="$task" method.save_path="$dest" "${OPTIONS[@]}" \
    modelpool="CLIPVisionModelPool/${POOL}_TA8" \
    taskpool=dummy \
    report_save_path="$dest.json" \
    "$@"
done
