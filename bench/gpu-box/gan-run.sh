#!/bin/bash
# One device call (repo root, .devcarry carried; peers.tar.xz is not needed and can be left out to save room):
# the CT GAN (training/configs/ct-gan-gpu.toml) started from the GPU-trained CNN copied into .devcarry/cnn.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); stamp() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
stamp setup
if [ -z "$SKIP_SETUP" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
rm -rf /tmp/data /tmp/gan runs/ct-cnn-gpu; mkdir -p /tmp/data runs/ct-cnn-gpu && tar -C /tmp/data -xJf .devcarry/ct-train.tar.xz
cp -r .devcarry/cnn runs/ct-cnn-gpu/model
export DICOM_NODE_SHARED_DATA=/tmp/data
python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))'
stamp gan
timeout -k 5 ${TRAIN_S:-380} python3 -m training ${TRAIN_CONFIG:-training/configs/ct-gan-gpu.toml} --run-dir /tmp/gan \
    --no-progress --time-limit ${TRAIN_MIN:-5} > "$OUT/gan-train.log" 2>&1
echo "rc=$?"; tail -25 "$OUT/gan-train.log"
cp /tmp/gan/log.csv "$OUT/gan-log.csv" 2>/dev/null
cp /tmp/gan/model/weights.safetensors "$OUT/" 2>/dev/null && cp /tmp/gan/model/card.toml "$OUT/" 2>/dev/null
stamp done; ls -la "$OUT"
