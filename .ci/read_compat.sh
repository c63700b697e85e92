#!/usr/bin/env bash
# CI, reading side: Python 3.12 with the newest zarr, in a fresh virtual environment WITHOUT
# torch, reads the stores the main test run (Python 3.11, torch) wrote. That proves both that
# reading needs no torch (the base install plus the test-read extra) and that stores written by
# one Python / zarr read back under another.
#
#   GDN_DUMP_COMPAT_STORES=$PWD/.ci-stores python -m pytest ...   (the main run writes them)
#   bash .ci/read_compat.sh "$PWD/.ci-stores"                     (this reads them)
#
# Where no Python 3.12 is found this part is skipped (one line, exit 0). The environment is
# made in a temporary directory and removed afterwards; torch must never be installed in it
# (a CPU torch wheel exists here only for 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
stores="${1:?usage: bash .ci/read_compat.sh DIR (the directory GDN_DUMP_COMPAT_STORES named in the main test run)}"
stores="$(cd "$stores" 2>/dev/null && pwd)" || { echo "read_compat: no directory $1" >&2; exit 1; }
if [ ! -f "$stores/manifest.json" ]; then
    echo "read_compat: no stores in $stores: run the main tests with GDN_DUMP_COMPAT_STORES=$stores first" >&2
    exit 1
fi

is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
py=""
if command -v python3.12 >/dev/null 2>&1 && is312 python3.12; then
    py="$(command -v python3.12)"
elif command -v pyenv >/dev/null 2>&1; then  # a pyenv shim that is not the selected version
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' || true); do
        candidate="$(pyenv root)/versions/$version/bin/python3.12"
        if [ -x "$candidate" ] && is312 "$candidate"; then py="$candidate"; break; fi
    done
fi
if [ -z "$py" ]; then
    echo "read_compat: no Python 3.12 found: skipping the reading check under Python 3.12 and the newest zarr"
    exit 0
fi

start=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" -m venv "$work/venv"
. "$work/venv/bin/activate"
quiet() { "$@" >"$work/log" 2>&1 || { cat "$work/log" >&2; echo "read_compat: failed: $*" >&2; exit 1; }; }
quiet python -m pip install -q --upgrade pip
quiet python -m pip install -q -e ".[test-read]"  # the base install and the reading tests: no torch
quiet python -m pip install -q --upgrade zarr
if python -c "import torch" >/dev/null 2>&1; then
    echo "read_compat: torch is importable in the reading environment; it must not be" >&2
    exit 1
fi
python - "$stores" <<'EOF'
import json, sys
from importlib.metadata import version
writer = json.load(open(f"{sys.argv[1]}/manifest.json"))["writer"]
print(f"read_compat: stores written by Python {writer['python']}, zarr {writer['zarr']}; read by Python "
      f"{sys.version.split()[0]}, zarr {version('zarr')}, numpy {version('numpy')}, "
      f"xarray {version('xarray')}, matplotlib {version('matplotlib')}, transformers {version('transformers')}; no torch")
EOF
echo "read_compat: environment ready in $((SECONDS - start)) s"
GDN_DUMP_COMPAT_STORES="$stores" python -m pytest -p no:cacheprovider tests/read/test_compat.py
echo "read_compat: done in $((SECONDS - start)) s"
