"""Recurrent states in a store: the stored snapshots, S_t at any position, the xarray coordinates,
the figure of ``plot --kind state``, and the measures of a state.

The stores are made by hand (zarr directly): random k, v, beta, log_decay rows and the snapshots
of S_t a plain float64 loop written here computes from them (independent of
:mod:`gdn_dump.ops.state_replay`). No torch at import: these run where torch is not installed.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from gdn_dump import open_store
from gdn_dump.cli.app import app
from gdn_dump.errors import GdnDumpError, StoreError
from gdn_dump.ops.state_replay import effective_rank, frobenius_norm, replay_state
from gdn_dump.read import figures
from gdn_dump.store.ledger import mark_ready, write_record

from .test_compat import BLOCK_TORCH

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HK, HV, DK, DV = 2, 4, 8, 6
STRIDE = 4
# Four prompts: lengths 9, 0 (skipped: no tokens, no snapshots), 13, 4, with gap rows between
# them on the token axis (9-11, 25-27, 32-33) and on the state axis (3-4, 9, 11).
STARTS, LENGTHS = np.array([0, 12, 12, 28]), np.array([9, 0, 13, 4])
N_ROWS = 34
STATE_STARTS = np.array([0, 5, 5, 10])
N_STATES = 12
GAP_VALUE = 1e6  # what unowned rows hold: never read as data
LAYERS = {0: "float64", 2: "float32"}  # layer 0 keeps k/v/beta/g rows; layer 2 only its states


def snapshot_positions(length: int) -> list[int]:
    """After every t with (t + 1) % STRIDE == 0, and after the last token."""
    return sorted({t for t in range(length) if (t + 1) % STRIDE == 0} | ({length - 1} if length else set()))


def reference_states(k, v, beta, g) -> np.ndarray:
    """S_t after every token, [n, Hv, K, V]: the recurrence of DESIGN.md section 2, one head and
    one token at a time, in float64."""
    n, n_v = v.shape[:2]
    out = np.zeros((n, n_v, k.shape[2], v.shape[2]))
    for h in range(n_v):
        kh = h // (n_v // k.shape[1])
        s = np.zeros((k.shape[2], v.shape[2]))
        for t in range(n):
            key = k[t, kh] / np.sqrt(np.sum(k[t, kh] ** 2) + 1e-6)
            s = np.exp(g[t, h]) * s
            s = s + beta[t, h] * np.outer(key, v[t, h] - s.T @ key)
            out[t, h] = s
    return out


def _rows(rng, n_rows):
    """Random k [n, Hk, K], v [n, Hv, V], beta, g [n, Hv] (float64), GAP_VALUE on unowned rows."""
    owned = np.zeros(n_rows, bool)
    for s, n in zip(STARTS, LENGTHS):
        owned[s:s + n] = True
    k = rng.normal(size=(n_rows, HK, DK))
    v = rng.normal(size=(n_rows, HV, DV))
    beta = rng.uniform(0.05, 1.0, (n_rows, HV))
    g = -rng.uniform(0.01, 1.5, (n_rows, HV))
    return [np.where(owned.reshape((-1,) + (1,) * (x.ndim - 1)), x, GAP_VALUE) for x in (k, v, beta, g)]


def _snapshots(k, v, beta, g):
    """Snapshot rows [N_STATES, Hv, K, V] (GAP_VALUE on gap rows), their positions (-1 on gaps),
    and every prompt's S_t after each token (the reference)."""
    states = np.full((N_STATES, HV, DK, DV), GAP_VALUE)
    positions = np.full(N_STATES, -1, np.int64)
    every = {}
    for p, (s, n) in enumerate(zip(STARTS, LENGTHS)):
        rows = slice(s, s + n)
        every[p] = reference_states(k[rows], v[rows], beta[rows], g[rows])
        at = snapshot_positions(n)
        lo = STATE_STARTS[p]
        states[lo:lo + len(at)] = every[p][at]
        positions[lo:lo + len(at)] = at
    return states, positions, every


def write_store(path: Path, *, with_states: bool = True, in_progress: bool = False, seed: int = 0):
    """A hand-made store; returns ``{layer: {prompt: S_t [n, Hv, K, V]}}`` (the reference)."""
    rng = np.random.default_rng(seed)
    status = "in_progress" if in_progress else "complete"
    group = zarr.open_group(str(path), mode="w", zarr_format=3,
                            attributes={"gdn_dump": {"status": status, "model": {"name": "no-such-org/none"}}})
    group.create_array("tokens", data=np.arange(N_ROWS, dtype=np.int32), chunks=(5,), dimension_names=["token"])
    group.create_array("prompt_start", data=STARTS.astype(np.int64), dimension_names=["prompt"])
    group.create_array("prompt_length", data=LENGTHS.astype(np.int64), dimension_names=["prompt"])
    ids = group.create_array("prompt_id", shape=(len(STARTS),), dtype=str, dimension_names=["prompt"])
    ids[:] = np.array(["a", "b", "c", "d"], dtype=object)
    reference, positions = {}, None
    for layer, dtype in LAYERS.items():
        k, v, beta, g = _rows(rng, N_ROWS)
        states, positions, reference[layer] = _snapshots(k, v, beta, g)
        if layer == 0:
            for hook, values, dims in (("k", k, ["token", "k_head", "d_k"]), ("v", v, ["token", "v_head", "d_v"]),
                                       ("beta", beta, ["token", "v_head"]), ("log_decay", g, ["token", "v_head"])):
                group.create_array(f"blocks.{layer}.linear_attn.hook_{hook}", data=values,
                                   chunks=(5,) + values.shape[1:], dimension_names=dims)
        if with_states:
            group.create_array(f"blocks.{layer}.linear_attn.hook_ssm_state", data=states.astype(dtype),
                               chunks=(3, HV, DK, DV), dimension_names=["state", "v_head", "d_k", "d_v"])
    group.create_array("blocks.1.linear_attn.hook_beta", data=rng.uniform(size=(N_ROWS, HV)),
                       chunks=(5, HV), dimension_names=["token", "v_head"])  # a layer without states
    if with_states:
        counts = [len(snapshot_positions(int(n))) for n in LENGTHS]
        group.create_array("state_start", data=STATE_STARTS.astype(np.int64), dimension_names=["prompt"])
        group.create_array("state_count", data=np.array(counts, np.int64), dimension_names=["prompt"])
        group.create_array("state_position", data=positions, chunks=(5,), dimension_names=["state"])
    if in_progress:  # two regions: prompts 0-1 written, 2-3 not yet
        mark_ready(group, {}, [[0, 2], [2, 4]], None)
        write_record(group, 0, {"done": True})
        write_record(group, 1, {"resume_from": 2})
    return reference


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    path = tmp_path_factory.mktemp("states") / "s.zarr"
    return path, write_store(path)


@pytest.fixture(scope="module")
def store(made):
    return open_store(made[0])


@pytest.fixture(scope="module")
def stateless(tmp_path_factory):
    path = tmp_path_factory.mktemp("stateless") / "s.zarr"
    write_store(path, with_states=False)
    return path


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    path = tmp_path_factory.mktemp("partial") / "s.zarr"
    return path, write_store(path, in_progress=True)


def _one_line(exc) -> str:
    text = str(exc.value if hasattr(exc, "value") else exc)
    assert text and "\n" not in text, text
    return text


# ---- the stored snapshots, S_t anywhere ----------------------------------------------------------

def test_the_hand_made_snapshots_follow_the_contract(store):
    """The fixture itself: positions increase, end at length - 1, gap rows are no prompt's."""
    positions = store["state_position"][:]
    for p, n in enumerate(LENGTHS):
        mine = positions[STATE_STARTS[p]:STATE_STARTS[p] + store["state_count"][p]]
        assert list(mine) == snapshot_positions(int(n)) and (not n or mine[-1] == n - 1)
    assert list(np.flatnonzero(positions == -1)) == [3, 4, 9, 11]


@pytest.mark.parametrize("layer", list(LAYERS))
def test_states_are_the_stored_snapshots(made, store, layer):
    path, reference = made
    group = zarr.open_group(str(path), mode="r")
    assert store.state_layers == [0, 2]
    for p, n in enumerate(LENGTHS):
        positions, states = store.states(p, layer)
        at = snapshot_positions(int(n))
        assert positions.dtype == np.int64 and list(positions) == at
        assert states.dtype == np.dtype(LAYERS[layer]) and states.shape == (len(at), HV, DK, DV)
        lo = STATE_STARTS[p]
        np.testing.assert_array_equal(states, group[f"blocks.{layer}.linear_attn.hook_ssm_state"][lo:lo + len(at)])
        np.testing.assert_allclose(states, reference[layer][p][at], rtol=1e-6 if LAYERS[layer] == "float32" else 0)


def test_state_at_every_position_equals_the_reference(made, store):
    _, reference = made
    for p, n in enumerate(LENGTHS):
        for t in range(int(n)):
            got = store.state(p, 0, t)
            assert got.dtype == np.float64 and got.shape == (HV, DK, DV)
            np.testing.assert_allclose(got, reference[0][p][t], rtol=1e-10, atol=1e-10, err_msg=f"prompt {p}, t={t}")


def test_a_snapshot_position_gives_the_snapshot_itself(store):
    positions, states = store.states(2, 2)  # float32, and layer 2 has no rows to replay from
    for i, t in enumerate(positions):
        got = store.state(2, 2, int(t))
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, states[i].astype(np.float64))
    np.testing.assert_array_equal(store.state(-2, 0, 12), store.states(2, 0)[1][-1])  # negative prompt index


def test_replay_from_a_snapshot_equals_replay_from_zero(made):
    group = zarr.open_group(str(made[0]), mode="r")
    rows = slice(int(STARTS[2]), int(STARTS[2] + LENGTHS[2]))
    k, v, beta, g = (group[f"blocks.0.linear_attn.hook_{h}"][rows] for h in ("k", "v", "beta", "log_decay"))
    snapshot = replay_state(None, k[:4], v[:4], beta[:4], g[:4])  # S_3
    for t in range(4, int(LENGTHS[2])):
        from_zero = replay_state(None, k[:t + 1], v[:t + 1], beta[:t + 1], g[:t + 1])
        from_snapshot = replay_state(snapshot, k[4:t + 1], v[4:t + 1], beta[4:t + 1], g[4:t + 1])
        np.testing.assert_allclose(from_snapshot, from_zero, rtol=1e-10, atol=1e-12)
    empty = replay_state(snapshot, k[:0], v[:0], beta[:0], g[:0])
    np.testing.assert_array_equal(empty, snapshot)
    assert empty is not snapshot
    np.testing.assert_array_equal(replay_state(None, k[:0], v[:0], beta[:0], g[:0]), np.zeros((HV, DK, DV)))


def test_a_prompt_without_tokens_has_no_states(store):
    positions, states = store.states(1, 0)
    assert positions.shape == (0,) and states.shape == (0, HV, DK, DV)
    with pytest.raises(StoreError) as caught:
        store.state(1, 0, 0)
    assert "position 0 is out of range: prompt 1 has 0 tokens, so no states" in _one_line(caught)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.state(0, 1, 0), "layer 1 has no recurrent states in "),
    (lambda s: s.states(0, 3), "layer 3 has no recurrent states in "),
    (lambda s: s.state(0, 0, 9), "position 9 is out of range: prompt 0 has 9 tokens (0-8)"),
    (lambda s: s.state(3, 0, -1), "position -1 is out of range: prompt 3 has 4 tokens (0-3)"),
    (lambda s: s.state(2, 2, 4), "store the rows to replay: --hooks ...,k,v,beta,log_decay"),
])
def test_errors_are_one_line(store, call, message):
    with pytest.raises(StoreError) as caught:
        call(store)
    text = _one_line(caught)
    assert message in text
    if "layer" in message:
        assert text.endswith("layers with them: 0, 2")


def test_a_non_snapshot_position_without_the_rows_names_what_is_missing(store):
    with pytest.raises(StoreError) as caught:
        store.state(2, 2, 4)
    text = _one_line(caught)
    assert "position 4 of prompt 2 is not a snapshot of layer 2 (its snapshots are at 3, 7, 11, 12)" in text
    assert "blocks.2.linear_attn.hook_k, blocks.2.linear_attn.hook_v" in text


def test_a_store_without_states_says_so(stateless):
    store = open_store(stateless)
    assert store.state_layers == []
    for call in (lambda: store.states(0, 0), lambda: store.state(0, 0, 3)):
        with pytest.raises(StoreError) as caught:
            call()
        assert "holds no recurrent states (store them with extract --hooks ...,ssm_state" in _one_line(caught)
    ds = store.to_xarray()
    assert "state_prompt" not in ds.coords and "state" not in ds.dims


# ---- xarray ---------------------------------------------------------------------------------------

def test_xarray_state_coordinates(store):
    ds = store.to_xarray()
    want = np.full(N_STATES, -1)
    for p, n in enumerate(LENGTHS):
        count = len(snapshot_positions(int(n)))
        want[STATE_STARTS[p]:STATE_STARTS[p] + count] = p
    assert ds["state_prompt"].dtype == np.int64 and ds["state_prompt"].dims == ("state",)
    np.testing.assert_array_equal(ds["state_prompt"].values, want)
    np.testing.assert_array_equal(ds["state_prompt"][2:6].values, want[2:6])  # lazily, a slice
    assert {"state_prompt", "state_position", "state_start", "state_count"} <= set(ds.coords)
    np.testing.assert_array_equal(ds["state_position"].values, store["state_position"][:])
    mine = ds["blocks.0.linear_attn.hook_ssm_state"].isel(state=ds["state_prompt"].values == 2)
    positions, states = store.states(2, 0)
    np.testing.assert_array_equal(mine.values, states)
    np.testing.assert_array_equal(mine["state_position"].values, positions)
    assert set(np.unique(ds["prompt"].values)) == {-1, 0, 2, 3}  # the token axis as before


# ---- stores in progress -----------------------------------------------------------------------------

def test_an_in_progress_store_hides_the_states_of_unfinished_prompts(partial):
    path, reference = partial
    store = open_store(path)
    assert store.status == "in_progress" and list(store.visible) == [0, 1]
    np.testing.assert_allclose(store.state(0, 0, 5), reference[0][0][5], rtol=1e-10, atol=1e-10)
    for call in (lambda: store.states(2, 0), lambda: store.state(2, 0, 3), lambda: store.state(3, 2, 3)):
        with pytest.raises(StoreError) as caught:
            call()
        assert "not finished" in _one_line(caught)
    ds = store.to_xarray()
    want = np.full(N_STATES, -1)
    want[0:3] = 0  # prompt 1 has no snapshots; prompts 2 and 3 are not finished
    np.testing.assert_array_equal(ds["state_prompt"].values, want)
    data = figures.state_data(store, layer=0)
    assert data["prompt"] == 0
    with pytest.raises(GdnDumpError) as caught:
        figures.state_data(store, layer=0, prompt=2)
    assert "--prompt 2 is not finished" in _one_line(caught)


# ---- figure data and the plot -------------------------------------------------------------------------

def _plain_rank(matrix) -> float:
    s = np.linalg.svd(matrix, compute_uv=False)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-sum(x * np.log(x) for x in p if x > 0)))


@pytest.mark.parametrize("layer, head, prompt", [(0, None, None), (2, 1, 2), (None, None, 3)])
def test_state_figure_data_equals_numpy(store, layer, head, prompt):
    data = figures.state_data(store, layer=layer, head=head, prompt=prompt, block_bytes=1)  # a snapshot a read
    layer = 0 if layer is None else layer
    prompt = 0 if prompt is None else prompt  # the first finished prompt with snapshots
    positions, states = store.states(prompt, layer)
    heads = list(range(HV)) if head is None else [head]
    assert (data["layer"], data["prompt"], data["prompt_id"], data["heads"]) == (layer, prompt, "abcd"[prompt], heads)
    np.testing.assert_array_equal(data["positions"], positions)
    x = states.astype(np.float64)
    norm = [[np.linalg.norm(x[i, h], "fro") for h in heads] for i in range(len(x))]
    rank = [[_plain_rank(x[i, h]) for h in heads] for i in range(len(x))]
    np.testing.assert_allclose(data["norm"], norm, rtol=1e-12)
    np.testing.assert_allclose(data["rank"], rank, rtol=1e-12)
    np.testing.assert_allclose(data["spectrum"], [np.linalg.svd(x[-1, h], compute_uv=False) for h in heads],
                               rtol=1e-12)
    assert data["spectrum"].shape == (len(heads), min(DK, DV))


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _plot(*args):
    return CliRunner().invoke(app, ["plot", *map(str, args)])


@pytest.mark.parametrize("extra", [[], ["--layer", "2"], ["--layer", "0", "--prompt", "3", "--head", "1"]])
def test_plot_kind_state_writes_a_png(made, tmp_path, extra):
    png = tmp_path / "state.png"
    result = _plot(made[0], "--kind", "state", "--out", png, *extra)
    assert result.exit_code == 0, result.stderr
    assert _png_size(png) == (1000, 600)
    assert f"wrote {png}" in result.stderr


@pytest.mark.parametrize("which, args, message", [
    ("stateless", [], "--kind state: the store has no recurrent states"),
    ("made", ["--layer", "1"], "--layer 1 has no recurrent states in this store; layers with them: 0, 2"),
    ("made", ["--prompt", "1"], "--prompt 1 has no state snapshots"),
    ("made", ["--prompt", "4"], "--prompt 4 is out of range"),
    ("made", ["--head", "4"], "--head 4 is out of range"),
    ("partial", ["--prompt", "3"], "--prompt 3 is not finished"),
])
def test_plot_kind_state_errors_are_one_line_exit_2(made, stateless, partial, tmp_path, which, args, message):
    path = {"made": made[0], "stateless": stateless, "partial": partial[0]}[which]
    png = tmp_path / "f.png"
    result = _plot(path, "--kind", "state", "--out", png, *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in result.stderr and result.stderr.strip().count("\n") == 0
    assert not png.exists()


# ---- the measures ------------------------------------------------------------------------------------

def test_effective_rank_and_norm_of_known_matrices():
    rng = np.random.default_rng(1)
    rank_one = np.outer(rng.normal(size=DK), rng.normal(size=DK))
    half = np.diag([3.0, 3.0, 0.0, 0.0] + [0.0] * (DK - 4))
    batch = np.stack([rank_one, np.eye(DK), np.zeros((DK, DK)), half])
    np.testing.assert_allclose(effective_rank(batch), [1.0, DK, 0.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(frobenius_norm(batch),
                               [np.linalg.norm(rank_one), np.sqrt(DK), 0.0, np.sqrt(18.0)], rtol=1e-12)
    assert effective_rank(np.zeros((2, 3, DK, DV))).shape == (2, 3)  # batched over leading dims
    assert frobenius_norm(np.ones((DK, DV))) == pytest.approx(np.sqrt(DK * DV))
    assert effective_rank(np.ones((DK, DV))) == pytest.approx(1.0)
    wide = np.eye(3, 5)  # not square: min(K, V) singular values
    assert effective_rank(wide) == pytest.approx(3.0)


def test_replay_state_expands_key_heads_like_repeat_interleave():
    """Value heads 0, 1 use key head 0 and 2, 3 key head 1: the same key, the same state, when
    their v, beta, g are the same."""
    rng = np.random.default_rng(2)
    n = 5
    k = rng.normal(size=(n, HK, DK))
    v = np.repeat(rng.normal(size=(n, 2, DV)), 2, axis=1)  # heads 0 = 1, 2 = 3
    beta = np.repeat(rng.uniform(size=(n, 2)), 2, axis=1)
    g = np.repeat(-rng.uniform(size=(n, 2)), 2, axis=1)
    s = replay_state(None, k, v, beta, g)
    np.testing.assert_array_equal(s[0], s[1])
    np.testing.assert_array_equal(s[2], s[3])
    np.testing.assert_allclose(s, reference_states(k, v, beta, g)[-1], rtol=1e-12, atol=1e-14)


# ---- no torch ------------------------------------------------------------------------------------------

READ_STATES_WITHOUT_TORCH = BLOCK_TORCH + '''
from pathlib import Path

import numpy as np

import gdn_dump
from gdn_dump.read import figures
from gdn_dump.read.plots import plot_store

path, out = Path(sys.argv[1]), Path(sys.argv[2])
store = gdn_dump.open_store(path)
np.save(out / "state.npy", store.state(2, 0, 6))
positions, states = store.states(0, 2)
assert len(positions) == len(states) == 3
assert (store.to_xarray()["state_prompt"].values >= -1).all()
figures.state_data(store, layer=0)
plot_store(store, "state", out / "state.png", layer=0)
leaked = [m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module is not None]
assert not leaked, leaked
'''


def test_reading_states_needs_no_torch(made, store, tmp_path):
    run = subprocess.run([sys.executable, "-c", READ_STATES_WITHOUT_TORCH, str(made[0]), str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "state.npy"), store.state(2, 0, 6))
    assert (tmp_path / "state.png").read_bytes()[:8] == PNG_SIGNATURE
