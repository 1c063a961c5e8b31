#!/bin/bash
# One device call (repo root, .devcarry carried): the GPU pipeline benchmark with ct-cnn, then a time-limited
# GPU training run of training/configs/ct-cnn-gpu.toml. Run locally with SKIP_SETUP=1 DEVICE=cpu SLICES=20 to rehearse.
# Each stage is bounded by timeout and writes its log under $OUT, so one failing stage leaves the others' results.
export PYTHONUNBUFFERED=1 TCP_NODELAY=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
stamp setup
[ -n "$SKIP_SETUP" ] || { source bench/gpu-box/setup.sh > "$OUT/setup.log" 2>&1; cat "$OUT/setup.log"; }
nvidia-smi -L; nproc; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))'
rm -rf /tmp/data /tmp/run; mkdir -p /tmp/data && tar -C /tmp/data -xJf .devcarry/ct-train.tar.xz
export DICOM_NODE_SHARED_DATA=/tmp/data
ls /tmp/data/ct
stamp "pipeline ct-cnn"
timeout -k 5 ${BENCH1_S:-130} python3 bench/pipeline.py --device ${DEVICE:-cuda} --slices ${SLICES:-300} --model ct-cnn > "$OUT/pipeline-gpu-ct-cnn.txt" 2>&1
echo "rc=$?"; tail -15 "$OUT/pipeline-gpu-ct-cnn.txt"
pkill -f libexec/Orthanc; pkill -f "dicom_node serve"; sleep 1
stamp training
timeout -k 5 ${TRAIN_S:-420} python3 -m training ${TRAIN_CONFIG:-training/configs/ct-cnn-gpu.toml} --run-dir /tmp/run --no-progress \
    --time-limit ${TRAIN_MIN:-4.5} > "$OUT/train.log" 2>&1
echo "rc=$?"; tail -20 "$OUT/train.log"
cp /tmp/run/log.csv "$OUT/train-log.csv" 2>/dev/null
cp /tmp/run/model/weights.safetensors "$OUT/" 2>/dev/null && cp /tmp/run/model/card.toml "$OUT/" 2>/dev/null
stamp done
ls -la "$OUT"
