#!/bin/bash
# Build .devcarry/ (ignored by git) on this Debian 12 development machine: what a bare GPU box needs to run the
# benchmarks and the GPU training configs, where it has torch but no dcmtk, no Orthanc, no pydicom and no internet.
#
#   bash bench/gpu-box/make-carry.sh        # then carry ".devcarry" in the device call
#
# peers.tar.xz (~20 MB: dcmtk + Orthanc with their libraries), whl/ (~7 MB: cp312 wheels), ct-train.tar.xz
# (~16 MB: the three CT series the GPU configs train and validate on). With the ~18 MB repo that is ~62 MB of
# the 64 MiB a device call carries: leave peers.tar.xz out (gan-run.sh does not need it) to carry a model.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CARRY=$ROOT/.devcarry
DATA=${DICOM_NODE_SHARED_DATA:-$ROOT/../shared/data}
mkdir -p "$CARRY/whl"
bash "$ROOT/bench/gpu-box/build-peers.sh"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/whl" pydicom==3.0.2 pynetdicom==3.0.4 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 \
    MarkupSafe==3.0.4 typing_extensions==4.16.0
python3 "$ROOT/bench/gpu-box/strip-wheels.py" "$CARRY"/whl/*.whl
tar -C "$DATA" -cf - ct/ge-head-7mm ct/philips-head-phantom-highdose-2.5mm ct/philips-head-phantom-lowdose-5mm |
    xz -6 -T0 > "$CARRY/ct-train.tar.xz"
du -sh "$CARRY"/*
