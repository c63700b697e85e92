"""Length-sorted batching: every prompt once, windows of consecutive prompts, rows in file order."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.run.schedule import Item, units

lengths_strategy = st.lists(st.integers(0, 40), min_size=1, max_size=60)


# The batches of schedule.units one after another, and their padding: what these tests look at.
def batches(items: Iterable[Item], batch_size: int, max_batch_tokens: int | None = None,
            window_tokens: int | None = None, boundary_every: int | None = None
            ) -> Iterator[list[Item]]:
    """The batches of :func:`units`, one after another."""
    for unit in units(items, batch_size, max_batch_tokens, window_tokens, boundary_every):
        yield from unit


def padding_fraction(batch_list: Iterable[list[Item]]) -> float:
    """Share of padded positions in ``batch_list`` (what sorting saves)."""
    real = padded = 0
    for batch in batch_list:
        lengths = [len(t) for _, t in batch]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / padded if padded else 0.0



def _items(lengths):
    return [(i, [7] * n) for i, n in enumerate(lengths)]


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_strategy, batch_size=st.integers(1, 9),
       max_batch_tokens=st.one_of(st.none(), st.integers(1, 120)),
       window=st.one_of(st.none(), st.integers(1, 200)))
def test_batches_cover_every_prompt_once_within_limits(lengths, batch_size, max_batch_tokens, window):
    out = list(batches(_items(lengths), batch_size, max_batch_tokens, window))
    seen = [p for batch in out for p, _ in batch]
    assert sorted(seen) == list(range(len(lengths)))
    for batch in out:
        assert 1 <= len(batch) <= batch_size
        width = max(len(t) for _, t in batch)
        if max_batch_tokens is not None and len(batch) > 1:
            assert width * len(batch) <= max_batch_tokens
    if window is None:  # file order
        assert seen == list(range(len(lengths)))
    else:  # windows are runs of consecutive prompts, each longest first, each under the bound
        position = 0
        while position < len(seen):
            held, end = 0, position
            while end < len(lengths):
                held += lengths[end]
                end += 1
                if held >= window:
                    break
            chunk = seen[position:end]
            assert sorted(chunk) == list(range(position, end))
            assert [lengths[p] for p in chunk] == sorted((lengths[p] for p in chunk), reverse=True)
            position = end


def test_sorting_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=256).tolist()
    plain = padding_fraction(batches(_items(lengths), 8))
    sorted_ = padding_fraction(batches(_items(lengths), 8, window_tokens=20_000))
    assert plain > 0.4 and sorted_ < 0.1


def _ragged_file(path, n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "b", "gamma delta", "é", "zz"]
    lines = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]
    lines[3] = ""  # a blank line is skipped by the reader
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _extract(tiny, prompts, out, **kw):
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), dtype="float32",
                                  hooks="q,v,beta,log_decay,recurrence_out", attn_layers="0,3",
                                  **kw), model=tiny)


def test_sorted_windows_give_the_same_store_as_file_order(tiny, tmp_path):
    prompts = _ragged_file(tmp_path / "p.txt", 40)
    plain = _extract(tiny, prompts, tmp_path / "plain.zarr", batch_size=5, sort_window_bytes=0)
    # a window of a few prompts' rows: several windows, each reordered
    window = 150 * plain.plan.bytes_per_token
    sorted_ = _extract(tiny, prompts, tmp_path / "sorted.zarr", batch_size=5, sort_window_bytes=window)
    assert sorted_.padding < plain.padding
    a = zarr.open_group(str(tmp_path / "plain.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "sorted.zarr"), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        if name == "prompt_id":
            assert list(a[name][:]) == list(b[name][:])
        else:  # same prompts, different batch partners: equal up to float32 reduction order
            np.testing.assert_allclose(a[name][:], b[name][:], rtol=0, atol=2e-5, err_msg=name)
    assert b.attrs["gdn_dump"]["status"] == "complete"


def test_reorder_memory_is_bounded_by_the_window_not_the_prompt_count(tiny, tmp_path):
    peaks = []
    for n in (30, 120):
        prompts = _ragged_file(tmp_path / f"p{n}.txt", n, seed=n)
        probe = _extract(tiny, prompts, tmp_path / f"probe{n}.zarr", dry_run=True)
        per_token = probe.plan.bytes_per_token
        window_tokens = 100
        result = _extract(tiny, prompts, tmp_path / f"s{n}.zarr", batch_size=4,
                          sort_window_bytes=window_tokens * per_token)
        longest = int(result.plan.prompt_lengths.max())
        assert 0 < result.peak_held_bytes <= (window_tokens + longest) * per_token
        assert result.peak_rss > 0
        peaks.append(result.peak_held_bytes)
    # four times the prompts, about the same peak (windows, not the file, set it)
    assert peaks[1] <= 2 * peaks[0]


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_strategy, batch_size=st.integers(1, 9),
       window=st.one_of(st.none(), st.integers(1, 200)), stream=st.integers(1, 41))
def test_a_prompt_that_streams_is_a_unit_of_its_own_after_every_earlier_prompt(lengths, batch_size,
                                                                              window, stream):
    out = list(units(_items(lengths), batch_size, None, window, None, stream))
    assert sorted(p for unit in out for batch in unit for p, _ in batch) == list(range(len(lengths)))
    done = 0  # units are runs of consecutive prompts: a streamed one runs when all before it ran
    for unit in out:
        prompts = sorted(p for batch in unit for p, _ in batch)
        assert prompts == list(range(done, done + len(prompts)))
        done += len(prompts)
        long = [p for p in prompts if lengths[p] >= stream]
        if long:
            assert unit == [[(long[0], [7] * lengths[long[0]])]]
