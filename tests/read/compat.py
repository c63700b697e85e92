"""The stores the reading checks of ``test_compat.py`` read, and what they should hold.

:func:`write_stores` runs where torch is installed (the main suite): it writes a few small stores
of the built-in tiny model and, beside them, the expected values computed independently (each
prompt run alone through TransformerLens's ``run_with_cache``; token ids; texts; which prompts
the progress records say are finished, read from the record files). ``test_compat.py`` reads them
where torch may not be installed, on another Python and another zarr (``.ci/read_compat.sh``).

No torch at import: the reading side imports :func:`load_stores` only.
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np

from ..helpers import RAGGED_PROMPTS

MANIFEST = "manifest.json"
EXPECTED = "expected.npz"
# name: (--hooks, --dtype, --attn-layers); every store has small chunks: prompts cross chunks
STORES = {
    "float16": (None, "float16", "0"),  # the default hooks, and layer 0's attention matrix
    "bfloat16": ("q,v,beta", "bfloat16", None),
    "states": ("k,v,beta,log_decay,ssm_state", "float32", None),  # snapshots every STATE_EVERY
}
STATE_EVERY = 4
STATE_LAYERS = (0, 1, 2)
CONTRIBUTIONS = "contributions"  # gdn-dump contributions of a GDN and the softmax layer, with vectors
CONTRIBUTION_LAYERS = (0, 3)
CONTRIBUTION_LENGTH = 24  # --max-length: the vectors stay small
PARTIAL = "partial"  # three regions: one complete, one stopped by a full disk, one never run
PARTIAL_HOOKS = "v,beta,log_decay"
WORDS = ["alpha", "b", "gamma delta", "é", "zz", "the quick"]


def key(kind: str, p: int, name: str = "") -> str:
    """The key of one expected array in ``expected.npz``."""
    return f"{kind}|{p}|{name}"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_stores(root: Path, tiny) -> dict:
    """Write the stores and the expected values into ``root`` (emptied first); the manifest."""
    import pytest
    import torch

    from gdn_dump.errors import RunFailure
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    from ..disk import fill_disk_at
    from ..helpers import reference_cache

    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()) and not (root / MANIFEST).exists():
        raise RuntimeError(f"{root} is not empty and holds no {MANIFEST}: not overwriting it")
    for old in root.iterdir():  # what an earlier run wrote here
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    texts = [t for t in RAGGED_PROMPTS if t.strip()]
    ids = [f"p{i}" for i in range(len(texts))]
    prompts = _jsonl(root / "prompts.jsonl", [{"id": i, "text": t} for i, t in zip(ids, texts)])
    hooks: dict[str, list[str]] = {}
    for name, (hook_list, dtype, attn_layers) in STORES.items():
        out = root / f"{name}.zarr"
        states = {"state_every": STATE_EVERY} if "ssm_state" in (hook_list or "") else {}
        extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), hooks=hook_list,
                               dtype=dtype, attn_layers=attn_layers, chunk_tokens=16, **states),
                model=tiny)
        stored = json.loads((out / "zarr.json").read_text())["attributes"]["gdn_dump"]["hooks"]
        hooks[name] = [h for h in stored if not h.endswith("hook_ssm_state")]  # the per-token ones

    expected: dict[str, np.ndarray] = {}
    wanted = sorted({h for names in hooks.values() for h in names})
    for p, text in enumerate(texts):
        token_ids, cache = reference_cache(tiny, text)
        expected[key("tokens", p)] = token_ids.numpy().astype(np.int32)
        for name in wanted:
            if name in cache:
                expected[key("hook", p, name)] = cache[name][0].to(torch.float32).numpy()
        for layer in CONTRIBUTION_LAYERS:  # what the contributions must sum to
            out = cache[f"blocks.{layer}.linear_attn.hook_out" if layer in STATE_LAYERS
                        else f"blocks.{layer}.attn.hook_out"]
            expected[key("layer_out", p, str(layer))] = out[0, :CONTRIBUTION_LENGTH].numpy()
        for layer in STATE_LAYERS:  # S_t at every t: TransformerLens's replay of the prompt alone
            states = tiny.bridge.blocks[layer].linear_attn.compute_ssm_state(cache, layer)
            expected[key("state", p, str(layer))] = states[0].numpy()

    extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(root / f"{CONTRIBUTIONS}.zarr"),
                           hooks="", command="contributions", contrib_vectors=True,
                           attn_layers=",".join(map(str, CONTRIBUTION_LAYERS)),
                           max_length=CONTRIBUTION_LENGTH), model=tiny)

    # An in_progress store of three regions: 0 complete, 1 stopped mid-way by a full disk (its
    # record says how far it got; rows after that may be half written), 2 never started.
    rows = [{"id": f"doc-{i:02d}", "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + 7 * i % 19))}
            for i in range(12)]
    partial_prompts = _jsonl(root / "partial.jsonl", rows)
    out = root / f"{PARTIAL}.zarr"
    small = dict(model="tiny", prompts=str(partial_prompts), out=str(out), hooks=PARTIAL_HOOKS,
                 dtype="float32", chunk_tokens=16, batch_size=2, sort_window_bytes=0,
                 checkpoint_every=0, writer="zarr")
    extract(ExtractOptions(shard="0/3", **small), model=tiny)
    scratch = shutil.copytree(out, root / "scratch.zarr")
    with pytest.MonkeyPatch.context() as mp:  # how many writes region 1 makes, in a copy
        writes = fill_disk_at(mp, 1 << 40)
        extract(ExtractOptions(shard="1/3", **{**small, "out": str(scratch)}), model=tiny)
    shutil.rmtree(scratch)
    with pytest.MonkeyPatch.context() as mp:  # the disk fills after three quarters of them
        fill_disk_at(mp, max(2, len(writes) * 3 // 4))
        with pytest.raises(RunFailure):
            extract(ExtractOptions(shard="1/3", **small), model=tiny)
    visible, regions = _recorded(out)
    lo, hi = regions[1]
    assert regions[0][0] in visible and regions[0][1] - 1 in visible  # region 0: all of it
    assert lo in visible and hi - 1 not in visible  # region 1: part of it (a record mid-region)
    assert not set(range(*regions[2])) & set(visible)  # region 2: nothing

    np.savez(root / EXPECTED, **expected)
    manifest = {
        "writer": {"python": platform.python_version(), "zarr": version("zarr"),
                   "numpy": version("numpy")},
        "texts": texts, "ids": ids, "hooks": hooks,
        "stores": {name: {"dtype": dtype, "attn_layers": attn_layers}
                   for name, (_, dtype, attn_layers) in STORES.items()},
        PARTIAL: {"texts": [r["text"] for r in rows], "ids": [r["id"] for r in rows],
                  "visible": visible, "regions": regions},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def _recorded(out: Path) -> tuple[list[int], list[list[int]]]:
    """The prompts the progress records say are on disk, read from the record files themselves
    (the ledger's on-disk form), and the regions."""
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]["gdn_dump"]
    regions = [list(map(int, r)) for r in attrs["processes"]["regions"]]
    visible = []
    for region, (lo, hi) in enumerate(regions):
        path = out / "_progress" / f"region-{region:05d}" / "zarr.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())["attributes"]
        end = hi if record.get("done") else min(int(record.get("resume_from", lo)), hi)
        visible += range(lo, max(lo, end))
    return visible, regions


def load_stores(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and the expected arrays of stores :func:`write_stores` wrote."""
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    with np.load(root / EXPECTED) as data:
        return manifest, {k: data[k] for k in data.files}
