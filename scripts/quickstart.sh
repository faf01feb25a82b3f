#!/usr/bin/env bash
# Set up (if needed), start a local deployment of the embedded default model,
# send a few requests, print the answers and the endpoints, and shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/exegpt demo "$@"
