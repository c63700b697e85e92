#!/usr/bin/env bash
# SAELens trains from a gdn-dump export (issue 16): a tiny packed store, exported with
# `gdn-dump export --format saelens`, then 100 steps of SAELens's own trainer on it, in SAELens's
# own virtual environment (sae-lens pins transformer-lens < 4, so it cannot share ours).
#
#   bash scripts/saelens_roundtrip.sh [WORKDIR]     (CI does not run it; needs the package index)
#
# Ours: $GDN_DUMP_VENV (default .venv; created with gdn-dump[extract,saelens] if missing).
# SAELens's: $SAELENS_VENV (default .venv-saelens), sae-lens $SAELENS_VERSION (default 6.54.12).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
ours="${GDN_DUMP_VENV:-.venv}"
theirs="${SAELENS_VENV:-.venv-saelens}"
version="${SAELENS_VERSION:-6.54.12}"
python="${PYTHON:-python3.11}"  # torch 2.13.0's CPU build is for Python 3.11 here

if [ ! -x "$ours/bin/gdn-dump" ]; then
  "$python" -m venv "$ours"
  "$ours/bin/pip" install -q torch==2.13.0
  "$ours/bin/pip" install -q -e ".[extract,saelens]"
fi
if [ ! -x "$theirs/bin/python" ] || ! "$theirs/bin/python" -c "import sae_lens" 2>/dev/null; then
  "$python" -m venv "$theirs"
  "$theirs/bin/pip" install -q torch==2.13.0  # the CPU build first: sae-lens would pull CUDA's
  "$theirs/bin/pip" install -q "sae-lens==$version"
fi
echo "SAELens's environment: $("$theirs/bin/python" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("sae-lens", "transformer-lens", "transformers", "datasets", "torch")))')"

# a corpus of random words, packed into contexts of 64 tokens of the tiny model
"$ours/bin/python" - "$work/corpus.jsonl" <<'PY'
import json, sys, random
rng = random.Random(0)
words = "the gated delta rule writes a value into the state and decays the rest".split()
with open(sys.argv[1], "w") as f:
    for i in range(400):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 80)))}) + "\n")
PY
hook=blocks.0.linear_attn.hook_recurrence_out
"$ours/bin/gdn-dump" extract --model tiny --prompts "$work/corpus.jsonl" --context-size 64 \
  --hooks recurrence_out --layers 0 --dtype float32 --out "$work/acts.zarr" --overwrite -q
"$ours/bin/gdn-dump" export "$work/acts.zarr" --format saelens --hook "$hook" --out "$work/cache" --overwrite
d_in=$("$ours/bin/python" -c "import json; print(json.load(open('$work/cache/gdn_dump_export.json'))['d_in'])")
"$theirs/bin/python" scripts/saelens_train.py "$work/cache" "$hook" 64 "$d_in" --steps 100
# the same from the store itself: gdn-dump's reader (the base install: no torch of its own, no
# TransformerLens) beside SAELens, store.sae_batches as SAELens's data provider
"$theirs/bin/pip" install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
"$theirs/bin/python" scripts/saelens_train.py "$work/acts.zarr" "$hook" 0 "$d_in" --steps 100 --sae-batches
