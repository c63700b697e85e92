"""What several test modules share: prompts of ragged lengths and the independent reference.

No torch at import: the reading tests run where torch is not installed.
"""

from __future__ import annotations

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


def reference_cache(model, text: str):
    """TransformerLens ``run_with_cache`` of one prompt alone (the independent reference)."""
    import torch

    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids, use_cache=False)
    return ids[0], cache
