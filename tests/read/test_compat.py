"""Reading stores back where torch is not installed, possibly on another Python and zarr.

Without torch at import, so ``.ci/read_compat.sh`` runs this module under Python 3.12 with the
newest zarr, in a virtual environment without torch, on the stores the main test run (Python
3.11, torch) wrote into ``$GDN_DUMP_COMPAT_STORES`` (see ``compat.py``). Where torch is installed
(the main suite), the stores are written first, into that directory if it is set, else into a
temporary one: so these checks always run.

Every expected value comes from outside the reader: TransformerLens's ``run_with_cache`` of each
prompt alone, the prompt file, the progress record files, or plain numpy / zarr slicing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from gdn_dump import open_store
from gdn_dump.errors import GdnDumpError, StoreError
from gdn_dump.read import figures

from .compat import (CONTRIBUTION_LAYERS, CONTRIBUTIONS, MANIFEST, PARTIAL, STATE_EVERY, STATE_LAYERS,
                     STORES, key, load_stores, write_stores)

ENV = "GDN_DUMP_COMPAT_STORES"
REPO = Path(__file__).resolve().parents[2]
HAS_TORCH = importlib.util.find_spec("torch") is not None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RTOL = {"float16": 1e-3, "bfloat16": 8e-3}  # one rounding to the stored type, and a little


@dataclass
class Compat:
    root: Path
    manifest: dict
    expected: dict

    def path(self, name: str) -> Path:
        return self.root / f"{name}.zarr"


@pytest.fixture(scope="session")
def compat(request, tmp_path_factory) -> Compat:
    where = os.environ.get(ENV)
    root = Path(where) if where else tmp_path_factory.mktemp("compat")
    if HAS_TORCH:
        write_stores(root, request.getfixturevalue("tiny"))
    elif not (where and (root / MANIFEST).exists()):
        pytest.fail(f"torch is not installed here: these tests read the stores a run with torch "
                    f"wrote; set {ENV}=DIR to the directory `{ENV}=DIR python -m pytest "
                    "tests/read/test_compat.py` filled")
    return Compat(root, *load_stores(root))


def _numpy(x) -> np.ndarray:
    """float32 of any stored float (bfloat16 and float16 convert exactly)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind in "fV" and x.dtype != np.float64 else x


def _visible(compat: Compat, name: str) -> list[int]:
    if name == PARTIAL:
        return compat.manifest[PARTIAL]["visible"]
    return list(range(len(compat.manifest["texts"])))


def _plain_rows(group, name: str, prompts) -> np.ndarray:
    """The rows of ``prompts`` of array ``name`` in row order, by plain zarr slicing."""
    starts, lengths = group["prompt_start"][:], group["prompt_length"][:]
    order = sorted(prompts, key=lambda p: int(starts[p]))
    return np.concatenate([group[name][int(starts[p]):int(starts[p] + lengths[p])] for p in order])


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


# ---- prompts: rows, tokens, text -----------------------------------------------------------------

@pytest.mark.parametrize("name", list(STORES))
def test_prompt_rows_equal_run_with_cache(compat, name):
    store = open_store(compat.path(name))
    texts, expected = compat.manifest["texts"], compat.expected
    assert store.status == "complete" and store.prompt_ids == compat.manifest["ids"]
    assert store.hooks == compat.manifest["hooks"][name]
    dtypes = {store[h].dtype.name for h in store.hooks}
    assert compat.manifest["stores"][name]["dtype"] in dtypes
    for p, text in enumerate(texts):
        record = store.prompt(p)
        np.testing.assert_array_equal(record.token_ids, expected[key("tokens", p)])
        assert record.text == text  # decoded with the tiny tokenizer, no torch needed
        for hook in store.hooks:
            dtype = store[hook].dtype.name
            np.testing.assert_allclose(_numpy(record[hook]), expected[key("hook", p, hook)],
                                       rtol=RTOL.get(dtype, 0), atol=1e-5, err_msg=f"{hook} of prompt {p}")


def test_attention_matrix_reproduces_the_recurrence_output(compat):
    """o_t = sum_j M[t, j] v_j per head: the stored matrix against the reference's v and o."""
    store = open_store(compat.path("float16"))
    assert store.matrices == ["blocks.0.attn_matrix"]
    assert store["blocks.0.attn_matrix"].attrs["kind"] == "gdn_exact"
    for p in range(store.n_prompts):
        record = store.prompt(p)
        m = record.matrix("blocks.0.attn_matrix")  # [heads, n, n]
        v = compat.expected[key("hook", p, "blocks.0.linear_attn.hook_v")]  # [n, heads, d_v]
        o = compat.expected[key("hook", p, "blocks.0.linear_attn.hook_recurrence_out")]
        assert m.shape == (v.shape[1], len(record), len(record))
        assert not np.triu(m, 1).any()  # causal: nothing above the diagonal
        mv = np.einsum("hij,jhd->ihd", m.astype(np.float64), v.astype(np.float64))
        assert np.linalg.norm(mv - o) <= 1e-4 * np.linalg.norm(o), p


def test_contributions_sum_to_the_layer_output(compat):
    """Read back without torch: the vectors sum over heads and sources to the reference's
    hook_out, the norms are their norms, the next-token logits stop at the last row."""
    from gdn_dump.catalogue import CONTRIBUTION_LOGIT, CONTRIBUTION_VECTORS

    store = open_store(compat.path(CONTRIBUTIONS))
    assert store.status == "complete"
    for p in range(store.n_prompts):
        record = store.prompt(p)
        n = len(record)
        for layer in CONTRIBUTION_LAYERS:
            vectors = record.contribution(layer, CONTRIBUTION_VECTORS).astype(np.float64)
            out = compat.expected[key("layer_out", p, str(layer))][:n]
            assert vectors.shape[1:3] == (n, n) and not np.triu(np.abs(vectors).sum(-1), 1).any()
            total = vectors.sum(axis=(0, 2))
            assert np.linalg.norm(total - out) <= 1e-5 * np.linalg.norm(out), (p, layer)
            np.testing.assert_allclose(record.contribution(layer), np.linalg.norm(vectors, axis=-1),
                                       rtol=1e-5, atol=1e-7)
            assert not record.contribution(layer, CONTRIBUTION_LOGIT)[:, n - 1].any()


def test_states_equal_compute_ssm_state_at_every_position(compat):
    """The snapshots, and S_t at every t replayed from them in numpy, against TransformerLens's
    ``compute_ssm_state`` of each prompt alone (written where torch is; read where it may not be)."""
    store = open_store(compat.path("states"))
    ds = store.to_xarray()
    assert store.state_layers == list(STATE_LAYERS)
    for p in range(store.n_prompts):
        length = int(store.prompt_length[p])
        for layer in STATE_LAYERS:
            trajectory = compat.expected[key("state", p, str(layer))]
            positions, states = store.states(p, layer)
            assert positions.tolist() == sorted({*range(STATE_EVERY - 1, length, STATE_EVERY), length - 1})
            np.testing.assert_allclose(states, trajectory[positions], rtol=1e-5, atol=1e-8)
            every = np.stack([store.state(p, layer, t) for t in range(length)])
            np.testing.assert_allclose(every, trajectory, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(ds.state_position.values[ds.state_prompt.values == p],
                                      store.states(p, 0)[0])


# ---- xarray -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*STORES, PARTIAL])
def test_to_xarray_selects_each_prompts_rows(compat, name):
    store = open_store(compat.path(name))
    ds = store.to_xarray()
    prompt = ds["prompt"].values
    visible = _visible(compat, name)
    assert set(np.unique(prompt)) <= {-1, *visible} and set(visible) <= set(np.unique(prompt))
    np.testing.assert_array_equal(ds["finished"].values, np.isin(np.arange(store.n_prompts), visible))
    for p in visible:
        record = store.prompt(p)
        mine = ds.isel(token=prompt == p)
        np.testing.assert_array_equal(mine["position"].values, np.arange(len(record)))
        np.testing.assert_array_equal(mine["tokens"].values, record.token_ids)
        for hook in store.hooks:
            np.testing.assert_array_equal(_numpy(mine[hook].values), _numpy(record[hook]), err_msg=hook)


OPEN_WITHOUT_GDN_DUMP = """
import sys
import numpy as np
import xarray as xr
import zarr

assert not [m for m in sys.modules if m.split(".")[0] == "gdn_dump"]
path, out, name = sys.argv[1:4]
ds = xr.open_zarr(path, consolidated=False)
group = zarr.open_group(path, mode="r")
start, n = int(group["prompt_start"][2]), int(group["prompt_length"][2])
assert group[name].dtype.name == ds[name].dtype.name == "bfloat16", group[name].dtype
np.savez(out, zarr=group[name][start:start + n].view(np.uint16),
         xarray=ds[name].values[start:start + n].view(np.uint16))
print("bfloat16 loaded by zarr from the entry point:", "gdn_dump.store.bfloat16" in sys.modules)
"""


def test_bfloat16_store_opens_in_a_process_that_never_imports_gdn_dump(compat, tmp_path):
    path, out = compat.path("bfloat16"), tmp_path / "rows.npz"
    name = "blocks.1.linear_attn.hook_q"
    assert "import gdn_dump" not in OPEN_WITHOUT_GDN_DUMP and "from gdn_dump" not in OPEN_WITHOUT_GDN_DUMP
    run = subprocess.run([sys.executable, "-c", OPEN_WITHOUT_GDN_DUMP, str(path), str(out), name],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "from the entry point: True" in run.stdout  # zarr imported it, the script did not
    want = open_store(path).prompt(2)[name].view(np.uint16)
    with np.load(out) as got:
        np.testing.assert_array_equal(got["zarr"], want)
        np.testing.assert_array_equal(got["xarray"], want)


# ---- batches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*STORES, PARTIAL])
def test_iter_batches_covers_each_owned_row_once(compat, name):
    store = open_store(compat.path(name))
    group = zarr.open_group(str(compat.path(name)), mode="r")
    whole = {n: group[n][:] for n in ["tokens", *store.hooks]}
    seen = []
    for batch in store.iter_batches(batch_tokens=7, shuffle=True, seed=3, block_tokens=16, shuffle_blocks=2):
        rows = group["prompt_start"][:][batch["prompt"]] + batch["position"]
        for n in ["tokens", *store.hooks]:
            np.testing.assert_array_equal(_numpy(batch[n]), _numpy(whole[n][rows]), err_msg=n)
        seen += list(zip(batch["prompt"].tolist(), batch["position"].tolist()))
    lengths = group["prompt_length"][:]
    owned = {(p, i) for p in _visible(compat, name) for i in range(int(lengths[p]))}
    assert len(seen) == len(set(seen)) and set(seen) == owned


# ---- figures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["float16", PARTIAL])
def test_figure_data_is_numpy_over_the_finished_prompts(compat, name):
    group = zarr.open_group(str(compat.path(name)), mode="r")  # the old way in: an open group
    visible = _visible(compat, name)
    layers = [0, 1, 2]
    grid = figures.half_life_grid(group)
    beta = figures.beta_grid(group, prompt=visible[-1])
    per_head = figures.distributions(group, "decay", layer=1)
    assert grid["layers"] == layers and grid["rows"] == len(_plain_rows(group, "tokens", visible))
    for i, layer in enumerate(layers):
        g = _plain_rows(group, f"blocks.{layer}.linear_attn.hook_log_decay", visible).astype(np.float64)
        np.testing.assert_allclose(grid["median"][:, i], np.median(np.log(0.5) / g, axis=0), rtol=1e-12)
        b = _plain_rows(group, f"blocks.{layer}.linear_attn.hook_beta", visible[-1:])
        np.testing.assert_allclose(beta["median"][:, i], np.median(b, axis=0), rtol=1e-12)
        if layer == 1:
            for h, values in enumerate(per_head["values"]):
                np.testing.assert_allclose(values, np.log10(np.log(0.5) / g[:, h]), rtol=1e-12)

    hook = "blocks.2.linear_attn.hook_v"
    blocks = list(figures.owned_blocks(group, hook, block_bytes=1))
    np.testing.assert_array_equal(np.concatenate([b for b, _, _ in blocks]), _plain_rows(group, hook, visible))
    assert set(np.concatenate([p for _, p, _ in blocks]).tolist()) == set(visible)

    profile = figures.norm_profile(group, "v")
    starts, lengths = group["prompt_start"][:], group["prompt_length"][:]
    n_pos = max(int(lengths[p]) for p in visible)
    total, count = np.zeros(n_pos), np.zeros(n_pos)
    for p in visible:
        x = group[hook][int(starts[p]):int(starts[p] + lengths[p])].astype(np.float64)
        total[:len(x)] += np.linalg.norm(x.reshape(len(x), -1), axis=1)
        count[:len(x)] += 1
    np.testing.assert_array_equal(profile["count"], count)
    np.testing.assert_allclose(profile["mean"][2], total / count, rtol=1e-5)

    if name == "float16":
        data = figures.attention_data(group, layer=0, head=3, prompt=2)
        n = int(lengths[2])
        np.testing.assert_array_equal(data["matrix"], group["blocks.0.attn_matrix"][2, 3, :n, :n])
        np.testing.assert_array_equal(data["tokens"], compat.expected[key("tokens", 2)])


def test_in_progress_store_shows_only_finished_prompts(compat, tmp_path):
    from typer.testing import CliRunner

    from gdn_dump.cli.app import app

    path = compat.path(PARTIAL)
    store = open_store(path)
    visible = compat.manifest[PARTIAL]["visible"]
    assert store.status == "in_progress"
    np.testing.assert_array_equal(store.visible, visible)
    unfinished = min(set(range(store.n_prompts)) - set(visible))
    assert store.prompt(visible[-1]).text == compat.manifest[PARTIAL]["texts"][visible[-1]]
    with pytest.raises(StoreError) as caught:
        store.prompt(unfinished)
    assert f"prompt {unfinished} " in _one_line(caught.value) and "not finished" in str(caught.value)
    group = zarr.open_group(str(path), mode="r")
    asks = [lambda: figures.half_life_grid(group, prompt=unfinished),
            lambda: figures.beta_grid(group, prompt=unfinished),
            lambda: figures.distributions(store, "beta", layer=0, prompt=unfinished),
            lambda: figures.norm_profile(path, "v", prompt=unfinished),
            lambda: list(figures.owned_blocks(store, "blocks.0.linear_attn.hook_v", prompt=unfinished))]
    for ask in asks:
        with pytest.raises(GdnDumpError) as caught:
            ask()
        assert f"--prompt {unfinished} is not finished" in _one_line(caught.value)

    png = tmp_path / "decay.png"
    refused = CliRunner().invoke(app, ["plot", str(path), "--kind", "decay", "--prompt", str(unfinished),
                                       "--out", str(png)])
    assert refused.exit_code == 2 and not png.exists()
    assert f"--prompt {unfinished} is not finished" in _one_line(refused.stderr.strip())
    drawn = CliRunner().invoke(app, ["plot", str(path), "--kind", "norms", "--hook", "v", "--out", str(png)])
    assert drawn.exit_code == 0, drawn.stderr
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert f"only its {len(visible)} finished prompts (of {store.n_prompts})" in drawn.stderr


# ---- no torch -----------------------------------------------------------------------------------

BLOCK_TORCH = '''
import importlib.abc
import importlib.util
import sys

BLOCKED = ("torch", "transformer_lens")


class NoTorch(importlib.abc.MetaPathFinder):
    """As if torch and TransformerLens were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None


sys.meta_path.insert(0, NoTorch())
for name in BLOCKED:
    # importlib.util.find_spec (how transformers asks whether torch is there) then says None, and
    # `import torch` raises ModuleNotFoundError without reaching any finder
    sys.modules[name] = None
'''

READ_WITHOUT_TORCH = BLOCK_TORCH + '''
import importlib
import json
from pathlib import Path

for name in ("torch", "torch.nn", "transformer_lens"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{name} could be imported")
assert importlib.util.find_spec("torch") is None

import numpy as np
import transformers.utils
import zarr
from typer.testing import CliRunner

import gdn_dump
from gdn_dump.cli.app import app
from gdn_dump.read import figures
from gdn_dump.read.plots import plot_store

assert not transformers.utils.is_torch_available()
root, out = Path(sys.argv[1]), Path(sys.argv[2])
result, arrays = {}, {}
for name in ("float16", "bfloat16", "partial"):
    store = gdn_dump.open_store(root / f"{name}.zarr")
    result[name] = {"texts": [store.prompt(int(p)).text for p in store.visible],
                    "visible": store.visible.tolist()}
    ds = store.to_xarray()
    hook = store.hooks[-1]
    arrays[f"{name}|xarray"] = ds[hook].isel(token=ds["prompt"].values == store.visible[-1]).values.astype(np.float32)
    seen = [(p, t) for b in store.iter_batches(batch_tokens=16, seed=1)
            for p, t in zip(b["prompt"].tolist(), b["position"].tolist())]
    result[name]["rows"] = [len(seen), len(set(seen))]
for name in ("float16", "partial"):
    arrays[f"{name}|median"] = figures.half_life_grid(zarr.open_group(str(root / f"{name}.zarr"), mode="r"))["median"]
plot_store(root / "float16.zarr", "attn", out / "attn.png", layer=0, head=1, prompt=0)
plot_store(root / "partial.zarr", "decay", out / "decay.png")
cli = CliRunner().invoke(app, ["plot", str(root / "float16.zarr"), "--kind", "norms", "--out", str(out / "norms.png")])
assert cli.exit_code == 0, cli.stderr
leaked = [m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module is not None]
assert not leaked, leaked
np.savez(out / "arrays.npz", **arrays)
(out / "result.json").write_text(json.dumps(result))
'''


def test_reading_needs_no_torch(compat, tmp_path):
    run = subprocess.run([sys.executable, "-c", READ_WITHOUT_TORCH, str(compat.root), str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    texts = {name: compat.manifest["texts"] for name in STORES} | {PARTIAL: compat.manifest[PARTIAL]["texts"]}
    with np.load(tmp_path / "arrays.npz") as arrays:
        for name, got in result.items():
            store = open_store(compat.path(name))
            assert got["visible"] == _visible(compat, name)
            assert got["texts"] == [texts[name][p] for p in got["visible"]]  # the tokenizer without torch
            n_rows = int(store.prompt_length[got["visible"]].sum())
            assert got["rows"] == [n_rows, n_rows]
            np.testing.assert_array_equal(arrays[f"{name}|xarray"],
                                          _numpy(store.prompt(got["visible"][-1])[store.hooks[-1]]))
        for name in ("float16", PARTIAL):
            np.testing.assert_array_equal(arrays[f"{name}|median"],
                                          figures.half_life_grid(compat.path(name))["median"])
    for png in ("attn.png", "decay.png", "norms.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_SIGNATURE


def test_the_blocker_blocks_torch(tmp_path):
    """The finder above really hides an installed torch (where one is installed)."""
    if not HAS_TORCH:
        pytest.skip("torch is not installed here: nothing to hide")
    code = BLOCK_TORCH + "\nimport torch\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "ModuleNotFoundError" in run.stderr
