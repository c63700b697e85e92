"""Shared fixtures: the built-in tiny model (loaded once) and prompt files of ragged lengths."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gdn_dump.model.load import load_model

# Very different lengths: 1 token, a few, ~60, ~300; a multi-byte character; a blank line skipped.
RAGGED_PROMPTS = [
    "hello world",
    "x",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "",
    "naïve café — ünïcødé " * 3,
    " ".join(f"word{i}" for i in range(50)),
    "short one",
]


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny", device="cpu")


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


def reference_cache(model, text: str):
    """TransformerLens ``run_with_cache`` of one prompt alone (the independent reference)."""
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids, use_cache=False)
    return ids[0], cache
