"""Shared fixtures: the built-in tiny model (loaded once) and prompt files of ragged lengths.

No torch at import (the reading tests run where torch is not installed): the model fixture loads
it when a test asks for it.
"""

from __future__ import annotations

import json
import random

import pytest

from .helpers import RAGGED_PROMPTS


@pytest.fixture(scope="session")
def tiny():
    from gdn_dump.model.load import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def mixed(tmp_path_factory):
    """``(path, model)``: a random Qwen3.5 with n_v = 4 n_k (1 key head, 4 value heads),
    d_k 16 != d_v 8, and a softmax-attention layer in the middle (GDN, attention, GDN, GDN)."""
    from gdn_dump.model.load import load_model

    from .helpers import save_random_checkpoint

    path = save_random_checkpoint(
        tmp_path_factory.mktemp("mixed") / "checkpoint", linear_num_key_heads=1,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])
    return str(path), load_model(str(path), device="cpu")


@pytest.fixture()
def ragged_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(RAGGED_PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def prompts_jsonl(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"doc-{i:03d}", "text": " ".join(rng.choice(["a", "bb", "ccc", "dddd"])
                                                   for _ in range(rng.randint(1, 40)))}
            for i in range(9)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows
