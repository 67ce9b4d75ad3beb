#!/usr/bin/env bash
# Install the LOWEST versions setup.cfg allows of transformers, peft and huggingface_hub (each floor pinned
# explicitly) into a fresh virtual environment, then run the core tests on them. Not part of every CI run (it
# installs a second environment); run it when a floor or the code near a version-dependent API changes, and write
# the result into docs/faq.md ("Supported versions").
#
#   bash scripts/check_floors.sh            # uses .floors-venv next to the repo
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FLOORS_VENV:-.floors-venv}"
FLOORS=("transformers==4.46.0" "peft==0.21.2" "huggingface-hub==0.34.0")
rm -rf "$VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0" "${FLOORS[@]}" -e ".[test]"
python -m pip list 2>/dev/null | grep -iE "^(transformers|peft|huggingface.hub|torch|datasets|accelerate) "
python -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_scoring.py tests/test_merging.py tests/test_layer_merge.py tests/test_search.py tests/test_d2c.py \
    tests/test_real_world.py
