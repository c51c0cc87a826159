#!/bin/sh
# Install one exported lock (runtime.txt, dev.txt, bench.txt or tools.txt) into the environment of $PYTHON,
# the same way on a laptop (Makefile), in CI and in the image (deploy/Dockerfile):
#   PYTHON=.venv/bin/python sh requirements/install.sh requirements/dev.txt
# Every file is checked against the hashes in the lock (--require-hashes), so every machine gets the same
# bytes whatever the index serves today.
set -eu
python=${PYTHON:-python3}
lock=$1
pip() { "$python" -m pip --disable-pip-version-check "$@"; }

pip install -q --require-hashes -r "$lock"

# xds-protos ships an old copy of opentelemetry-proto's modules (grpc/grpc#42926) under the same import path,
# and whichever of the two pip installs last owns opentelemetry/proto/. Reinstall the locked
# opentelemetry-proto (its own lines of the lock, hashes included) so the current modules win, then check.
if grep -q '^opentelemetry-proto==' "$lock"; then
    picked=$(mktemp)
    trap 'rm -f "$picked"' EXIT
    # a package's entry: its `name==version \` line and the indented hash lines below it
    awk '/^[^ #]/ { take = ($0 ~ /^opentelemetry-proto==/) } take' "$lock" > "$picked"
    pip install -q --require-hashes --no-deps --force-reinstall -r "$picked"
    "$python" -c 'from opentelemetry.proto.common.v1 import common_pb2
assert hasattr(common_pb2, "InstrumentationScope"), "opentelemetry-proto is still the old copy from xds-protos"'
fi
