#!/usr/bin/env bash
# Here (with pip and a registry), once: the wheels the GPU image lacks, for Python 3.12 x86-64,
# into .whl/ (ignored by git; carried to the device machine with carry: [".whl"]).
# The image has torch, transformers, grpcio (version unknown), protobuf (version unknown),
# nvidia-ml-py, prometheus-client, psutil, pyyaml, rich; the generated stubs need
# grpcio >= 1.85.1 and protobuf 7.x, so those travel too.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  grpcio-status==1.85.3 googleapis-common-protos==1.76.0 structlog==26.1.0
ls -la .whl
