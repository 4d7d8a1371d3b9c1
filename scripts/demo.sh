#!/usr/bin/env bash
# The main job: until the protected VM pair exists, replay a generated capture pair through the
# comparator and print the report a person reads.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DEMO_DIR:-build/demo}
mkdir -p "$out"
.venv/bin/hybridft compare demo --out "$out"
