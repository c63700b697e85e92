"""gdn-dump plot: each kind writes a PNG of the asked size, and the data behind it equals numpy."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from gdn_dump.read import figures
from gdn_dump.cli.app import app
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract

from ..helpers import RAGGED_PROMPTS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GDN_LAYERS = [0, 1, 2]
V_HEADS = 4


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("plot")
    prompts = base / "prompts.txt"
    prompts.write_text("\n".join(RAGGED_PROMPTS) + "\n", encoding="utf-8")
    out = base / "s.zarr"
    # small chunks: the readers cross chunk boundaries inside prompts
    extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), dtype="float32",
                           hooks="v,beta,log_decay,recurrence_out", attn_layers="0", chunk_tokens=16),
            model=tiny)
    return out


@pytest.fixture(scope="module")
def group(store):
    return zarr.open_group(str(store), mode="r")


@pytest.fixture(scope="module")
def gapped(tmp_path_factory):
    """A hand-made store with unowned rows (full of 1e6, 6e4 in float16) between and after the prompts, a skipped
    prompt, chunks of 3 rows, prompts listed out of row order."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gap") / "g.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3,
                            attributes={"gdn_dump": {"status": "complete", "model": {"name": "no-such-org/none"}}})
    starts, lengths = np.array([9, 0, 9, 20]), np.array([7, 5, 0, 4])
    n_rows = 27
    owned = np.zeros(n_rows, bool)
    for s, n in zip(starts, lengths):
        owned[s:s + n] = True
    for layer in (0, 2):
        g = np.where(owned[:, None], -rng.uniform(0.01, 2.0, (n_rows, 3)), 1e6).astype(np.float32)
        b = np.where(owned[:, None], rng.uniform(0, 1, (n_rows, 3)), 1e6).astype(np.float32)
        v = np.where(owned[:, None, None], rng.normal(size=(n_rows, 3, 5)), 6e4).astype(np.float16)
        for hook, values, dims in (("log_decay", g, ["token", "v_head"]), ("beta", b, ["token", "v_head"]),
                                   ("v", v, ["token", "v_head", "d_v"])):
            group.create_array(f"blocks.{layer}.linear_attn.hook_{hook}", data=values,
                               chunks=(3,) + values.shape[1:], dimension_names=dims)
    group.create_array("tokens", data=np.arange(n_rows, dtype=np.int32), chunks=(3,), dimension_names=["token"])
    group.create_array("prompt_start", data=starts.astype(np.int64), dimension_names=["prompt"])
    group.create_array("prompt_length", data=lengths.astype(np.int64), dimension_names=["prompt"])
    ids = group.create_array("prompt_id", shape=(4,), dtype=str, dimension_names=["prompt"])
    ids[:] = np.array(["a", "b", "c", "d"], dtype=object)
    matrix = np.tril(rng.uniform(size=(4, 2, 7, 7))).astype(np.float32)
    group.create_array("blocks.2.attn_matrix", data=matrix, dimension_names=["prompt", "v_head", "query", "key"],
                       attributes={"kind": "gdn_exact"})
    return path


def _owned(group, name, prompt=None):
    """Owned rows of an array, prompt after prompt (the plain way)."""
    starts, lengths = group["prompt_start"][:], group["prompt_length"][:]
    chosen = range(len(starts)) if prompt is None else [prompt]
    return np.concatenate([group[name][int(starts[p]):int(starts[p] + lengths[p])] for p in chosen])


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _plot(*args):
    return CliRunner().invoke(app, ["plot", *map(str, args)])


# ------------------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("kind, extra", [
    ("decay", []), ("decay", ["--layer", "1"]), ("decay", ["--head", "2"]),
    ("beta", []), ("beta", ["--layer", "2", "--prompt", "0"]),
    ("attn", ["--layer", "0", "--head", "3", "--prompt", "2"]), ("attn", []),
    ("norms", []), ("norms", ["--layer", "1"]), ("norms", ["--hook", "v", "--prompt", "5"]),
    ("norms", ["--hook", "beta", "--head", "1"]),
])
def test_each_kind_writes_a_png_of_the_asked_size(store, tmp_path, kind, extra):
    png = tmp_path / "fig.png"
    result = _plot(store, "--kind", kind, "--out", png, *extra)
    assert result.exit_code == 0, result.stderr
    assert _png_size(png) == (1000, 600)
    assert f"wrote {png}" in result.stderr


def test_width_height_and_dpi_set_the_pixel_size(store, tmp_path):
    from matplotlib.image import imread

    png = tmp_path / "small.png"
    result = _plot(store, "--kind", "decay", "--out", png, "--width", "4", "--height", "3", "--dpi", "80")
    assert result.exit_code == 0, result.stderr
    assert _png_size(png) == (320, 240)
    assert imread(png).shape[:2] == (240, 320)


@pytest.mark.parametrize("args, message", [
    (["--kind", "decay"], "no such store"),
    (["--kind", "histogram"], "--kind 'histogram' is unknown"),
    (["--kind", "decay", "--layer", "3"], "--layer 3 has no log_decay in this store; layers with it: 0, 1, 2"),
    (["--kind", "norms", "--layer", "7"], "--layer 7 has no recurrence_out"),
    (["--kind", "norms", "--hook", "q"], "no q array"),
    (["--kind", "attn", "--layer", "1"], "--layer 1 has no attn_matrix in this store; layers with one: 0"),
    (["--kind", "attn", "--head", "4"], "--head 4 is out of range"),
    (["--kind", "decay", "--layer", "0", "--head", "9"], "--head 9 is out of range"),
    (["--kind", "norms", "--layer", "0", "--head", "-1"], "--head -1 is out of range"),
    (["--kind", "attn", "--prompt", "6"], "--prompt 6 is out of range: the store has 6 prompts"),
    (["--kind", "beta", "--prompt", "-1"], "--prompt -1 is out of range"),
    (["--kind", "decay", "--out", "NODIR"], "does not exist"),
    (["--kind", "decay", "--out", "fig.nope"], "unknown image format 'nope'"),
    (["--kind", "decay", "--dpi", "0"], "must be positive"),
])
def test_errors_are_one_line_exit_2(store, tmp_path, args, message):
    target = tmp_path / "missing.zarr" if message == "no such store" else store
    out = {"NODIR": tmp_path / "nodir" / "f.png", "fig.nope": tmp_path / "fig.nope"}
    if "--out" in args:
        i = args.index("--out")
        args = args[:i] + ["--out", str(out[args[i + 1]])] + args[i + 2:]
    else:
        args = args + ["--out", str(tmp_path / "f.png")]
    result = _plot(target, *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "f.png").exists()


# ------------------------------------------------------------------------------------------ data

def test_half_life_grid_is_the_numpy_median_per_head_and_layer(group):
    grid = figures.half_life_grid(group)
    assert grid["layers"] == GDN_LAYERS and grid["median"].shape == (V_HEADS, 3)
    assert grid["rows"] == grid["sampled"] == int(group["prompt_length"][:].sum())
    for i, layer in enumerate(GDN_LAYERS):
        g = _owned(group, f"blocks.{layer}.linear_attn.hook_log_decay").astype(np.float64)
        assert (g < 0).all()
        hl = np.log(0.5) / g
        np.testing.assert_allclose(grid["median"][:, i], np.median(hl, axis=0), rtol=1e-12)
        np.testing.assert_allclose(grid["q25"][:, i], np.percentile(hl, 25, axis=0), rtol=1e-12)
        np.testing.assert_allclose(grid["q75"][:, i], np.percentile(hl, 75, axis=0), rtol=1e-12)


def test_beta_grid_and_distributions_are_numpy(group):
    grid = figures.beta_grid(group, prompt=5)
    per_head = figures.distributions(group, "decay", layer=2)
    per_layer = figures.distributions(group, "beta", head=1)
    for i, layer in enumerate(GDN_LAYERS):
        beta = _owned(group, f"blocks.{layer}.linear_attn.hook_beta", prompt=5)
        np.testing.assert_allclose(grid["median"][:, i], np.median(beta, axis=0), rtol=1e-12)
        np.testing.assert_allclose(grid["q75"][:, i] - grid["q25"][:, i],
                                   np.subtract(*np.percentile(beta, [75, 25], axis=0)), atol=1e-12)
        np.testing.assert_array_equal(per_layer["values"][i],
                                      _owned(group, f"blocks.{layer}.linear_attn.hook_beta")[:, 1])
    assert per_head["axis"] == "head" and per_head["labels"] == list(range(V_HEADS))
    g = _owned(group, "blocks.2.linear_attn.hook_log_decay").astype(np.float64)
    for h in range(V_HEADS):
        np.testing.assert_allclose(per_head["values"][h], np.log10(np.log(0.5) / g[:, h]), rtol=1e-12)
    assert per_layer["axis"] == "layer" and per_layer["labels"] == GDN_LAYERS


def _plain_profile(group, name, prompt=None, head=None):
    """The mean over prompts of ||x[t]|| with plain loops."""
    starts, lengths = group["prompt_start"][:], group["prompt_length"][:]
    chosen = range(len(starts)) if prompt is None else [prompt]
    n_pos = max(int(lengths[p]) for p in chosen)
    total, count = np.zeros(n_pos), np.zeros(n_pos)
    for p in chosen:
        for t in range(int(lengths[p])):
            x = group[name][int(starts[p]) + t].astype(np.float64)
            total[t] += np.linalg.norm(x.ravel() if head is None else x[head].ravel())
            count[t] += 1
    return total / count, count


def test_norm_profile_is_a_plain_loop(group):
    profile = figures.norm_profile(group)
    assert profile["labels"] == [f"layer {layer}" for layer in GDN_LAYERS]
    for i, layer in enumerate(GDN_LAYERS):
        expected, count = _plain_profile(group, f"blocks.{layer}.linear_attn.hook_recurrence_out")
        np.testing.assert_allclose(profile["mean"][i], expected, rtol=1e-5)
        np.testing.assert_array_equal(profile["count"], count)
    per_head = figures.norm_profile(group, "hook_v", layer=1, prompt=4)
    assert per_head["labels"] == [f"head {h}" for h in range(V_HEADS)]
    for h in range(V_HEADS):
        expected, _ = _plain_profile(group, "blocks.1.linear_attn.hook_v", prompt=4, head=h)
        np.testing.assert_allclose(per_head["mean"][h], expected, rtol=1e-5)
    one = figures.norm_profile(group, "blocks.1.linear_attn.hook_v", layer=1, head=2, prompt=4)
    np.testing.assert_array_equal(one["mean"], per_head["mean"][2:3])
    head_per_layer = figures.norm_profile(group, "v", head=2, prompt=4)
    assert head_per_layer["labels"] == [f"layer {layer}, head 2" for layer in GDN_LAYERS]
    np.testing.assert_array_equal(head_per_layer["mean"][1], per_head["mean"][2])


def test_attention_data_and_token_labels(group):
    from gdn_dump.tokenizer import build_tiny_tokenizer
    from gdn_dump.read.plots import token_labels

    data = figures.attention_data(group, layer=0, head=3, prompt=0)
    n = int(group["prompt_length"][0])
    np.testing.assert_array_equal(data["matrix"], group["blocks.0.attn_matrix"][0, 3, :n, :n])
    tokenizer = figures.store_tokenizer(group)
    assert tokenizer is not None
    assert "".join(token_labels(tokenizer, data["tokens"])) == RAGGED_PROMPTS[0].replace(" ", "\u2423")
    assert build_tiny_tokenizer().decode(list(map(int, data["tokens"]))) == RAGGED_PROMPTS[0]


def test_gap_rows_are_never_read_and_blocks_cross_chunks(gapped):
    group = zarr.open_group(str(gapped), mode="r")
    for layer in (0, 2):
        name = f"blocks.{layer}.linear_attn.hook_log_decay"
        g = _owned(group, name).astype(np.float64)
        blocks = list(figures.owned_blocks(group, name, block_bytes=1))
        assert sum(len(b) for b, _, _ in blocks) == 16
        rows = np.concatenate([b for b, _, _ in blocks])
        assert (rows < 0).all()
        prompts = np.concatenate([p for _, p, _ in blocks])
        positions = np.concatenate([t for _, _, t in blocks])
        assert list(prompts) == [1] * 5 + [0] * 7 + [3] * 4
        assert list(positions) == list(range(5)) + list(range(7)) + list(range(4))
        grid = figures.half_life_grid(group)
        np.testing.assert_allclose(grid["median"][:, (0, 2).index(layer)],
                                   np.median(np.log(0.5) / g, axis=0), rtol=1e-12)
    profile = figures.norm_profile(group, "v")
    expected, count = _plain_profile(group, "blocks.2.linear_attn.hook_v")
    np.testing.assert_allclose(profile["mean"][1], expected, rtol=1e-5)
    assert list(count) == [3, 3, 3, 3, 2, 1, 1]


def test_large_stores_use_an_even_stride_of_the_owned_rows(gapped):
    group = zarr.open_group(str(gapped), mode="r")
    values, total = figures.layer_sample(group, "beta", 2, max_rows=5)
    owned = _owned(group, "blocks.2.linear_attn.hook_beta")
    # row order (prompt 1 at row 0 first), every ceil(16 / 5) = 4th owned row
    in_row_order = np.concatenate([owned[7:12], owned[:7], owned[12:]])
    assert total == 16
    np.testing.assert_array_equal(values, in_row_order[::math.ceil(16 / 5)])


def test_attn_labels_fall_back_to_token_ids(gapped, tmp_path):
    group = zarr.open_group(str(gapped), mode="r")
    assert figures.store_tokenizer(group) is None  # not in any local cache; nothing downloaded
    png = tmp_path / "a.png"
    result = _plot(gapped, "--kind", "attn", "--prompt", "3", "--head", "1", "--out", png,
                   "--width", "5", "--height", "5")
    assert result.exit_code == 0, result.stderr
    assert _png_size(png) == (500, 500)
    skipped = _plot(gapped, "--kind", "attn", "--prompt", "2", "--out", png)
    assert skipped.exit_code == 2 and "--prompt 2 has no stored tokens" in skipped.stderr


def test_plotting_leaves_matplotlib_state_alone(store, tmp_path):
    """A notebook's backend and its open figures stay as they were: figures are drawn with
    matplotlib's object API, never through pyplot."""
    import matplotlib
    import matplotlib.pyplot as plt

    from gdn_dump.read.plots import attention_heatmaps, plot_store

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # what the user chose
    mine = plt.figure()
    try:
        figures_before = plt.get_fignums()
        for kind in ("decay", "beta", "attn", "norms"):
            plot_store(store, kind, tmp_path / f"{kind}.png")
        plot_store(store, "decay", tmp_path / "d.png", layer=1)
        written = attention_heatmaps(zarr.open_group(str(store), mode="r"), tmp_path / "heat", max_prompts=1)
        assert written and all(_png_size(p) == (600, 600) for p in written)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figures_before and plt.fignum_exists(mine.number)
    finally:
        plt.close(mine)
        matplotlib.use(before)
