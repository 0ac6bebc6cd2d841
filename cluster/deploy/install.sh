#!/usr/bin/env bash
# Install geodiff4d (a regular, not editable, install) with its pinned dependencies into one Python
# environment: the Ray image's (Dockerfile) or a fresh virtualenv (tests/test_deploy.py runs this script too).
# PYTHON picks the interpreter (default: python3 on PATH); pip's own settings (index, wheel store) apply.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python3}"
cd "$repo"
"$python" -m pip install -r requirements.txt -c requirements.lock
"$python" -m pip install --no-deps -r requirements-nodeps.txt
"$python" -m pip install --no-deps .
# The console script lands beside the interpreter, which is on PATH in the image
"$(dirname "$("$python" -c 'import sys; print(sys.executable)')")/geodiff4d" --help > /dev/null
echo "geodiff4d installed into $("$python" -c 'import sys; print(sys.prefix)')"
