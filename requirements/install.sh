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

# Progress: how much is coming, then pip's own lines and bars on a terminal; a log (CI, the image build)
# gets the count and pip's warnings only.
count=$(grep -c '^[A-Za-z0-9]' "$lock" || true)
echo "install.sh: $count locked packages from $lock into $("$python" -c 'import sys; print(sys.prefix)')"
if [ -t 1 ]; then quiet=""; else quiet="-q"; fi

pip install $quiet --require-hashes -r "$lock"

# xds-protos ships an old copy of opentelemetry-proto's modules (grpc/grpc#42926) under the same import path,
# and whichever of the two pip installs last owns opentelemetry/proto/. Reinstall the locked
# opentelemetry-proto (its own lines of the lock, hashes included) so the current modules win, then check.
if grep -q '^opentelemetry-proto==' "$lock"; then
    picked=$(mktemp)
    trap 'rm -f "$picked"' EXIT
    # a package's entry: its `name==version \` line and the indented hash lines below it
    awk '/^[^ #]/ { take = ($0 ~ /^opentelemetry-proto==/) } take' "$lock" > "$picked"
    echo "install.sh: opentelemetry-proto again, over the copy xds-protos ships"
    pip install -q --require-hashes --no-deps --force-reinstall -r "$picked"
    "$python" -c 'from opentelemetry.proto.common.v1 import common_pb2
assert hasattr(common_pb2, "InstrumentationScope"), "opentelemetry-proto is still the old copy from xds-protos"'
fi
