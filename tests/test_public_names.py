"""Every public name importable where the README shows it, and where the 0.1 README showed it."""

from __future__ import annotations


def test_reading_names():
    import gdn_dump
    from gdn_dump.read.reader import Store, open_store

    assert gdn_dump.open_store is open_store and gdn_dump.Store is Store
    assert isinstance(gdn_dump.__version__, str) and gdn_dump.__version__


def test_the_paths_of_the_first_readme_still_work():
    from gdn_dump import figures as old_figures
    from gdn_dump.ops.stats import histogram_median
    from gdn_dump.read import figures
    from gdn_dump.stats import histogram_median as old_median

    assert old_median is histogram_median
    for name in ("half_life_grid", "beta_grid", "norm_profile", "distributions", "attention_data"):
        assert getattr(old_figures, name) is getattr(figures, name)


def test_the_library_names_of_a_run():
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract
    from gdn_dump.run.result import ExtractResult, Reporter

    assert callable(extract) and ExtractOptions and ExtractResult and Reporter
