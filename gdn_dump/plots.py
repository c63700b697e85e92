"""Heatmaps of stored attention matrices (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import GdnDumpError

LABEL_MAX_TOKENS = 48  # token strings on the axes only where they stay readable


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise GdnDumpError("--png needs matplotlib: pip install 'gdn-dump[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def token_labels(tokenizer, token_ids) -> list[str]:
    """One readable string per token (byte-level pieces decoded, whitespace made visible)."""
    labels = []
    for token in token_ids:
        text = tokenizer.decode([int(token)])
        labels.append(text.replace("\n", "\\n").replace(" ", "\u2423") or "\u2205")
    return labels


def attention_heatmaps(group, out_dir: str | Path, tokenizer=None, *, max_prompts: int = 4,
                       log_scale: bool = False, size_inches: float = 6.0, dpi: int = 100) -> list[Path]:
    """One PNG per (prompt, layer, head) for the first ``max_prompts`` prompts of a store."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm, Normalize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(name for name, _ in group.arrays() if name.endswith("attn_matrix"))
    starts, lengths = group["prompt_start"][:], group["prompt_length"][:]
    ids = group["prompt_id"][:]
    written = []
    for p in range(min(max_prompts, len(lengths))):
        n = int(lengths[p])
        if n == 0:
            continue
        tokens = group["tokens"][int(starts[p]):int(starts[p]) + n]
        labels = token_labels(tokenizer, tokens) if tokenizer is not None and n <= LABEL_MAX_TOKENS else None
        for name in names:
            arr = group[name]
            heads = arr.attrs.get("heads", list(range(arr.shape[1])))
            block = arr[p, :, :n, :n]
            for i, head in enumerate(heads):
                path = out / f"prompt{p}_{name.replace('.', '_')}_head{head}.png"
                _heatmap(plt, block[i], labels, path, log_scale, size_inches, dpi,
                         f"{name} head {head} ({arr.attrs.get('kind')}), prompt {ids[p]}",
                         LogNorm, Normalize)
                written.append(path)
    return written


def _heatmap(plt, matrix, labels, path, log_scale, size_inches, dpi, title, LogNorm, Normalize):
    fig, ax = plt.subplots(figsize=(size_inches, size_inches), dpi=dpi)
    lower = np.tril(np.ones_like(matrix, dtype=bool))
    if log_scale:
        magnitude = np.where(lower, np.abs(matrix), np.nan)
        positive = magnitude[magnitude > 0]
        vmin = float(positive.min()) if positive.size else 1e-12
        image = ax.imshow(magnitude, norm=LogNorm(vmin=vmin, vmax=max(vmin * 10, float(np.nanmax(magnitude)))),
                          cmap="viridis")
        label = "|M[i, j]| (log)"
    else:
        shown = np.where(lower, matrix, np.nan)
        bound = float(np.nanmax(np.abs(shown))) or 1.0
        signed = bool(np.nanmin(shown) < 0)
        image = ax.imshow(shown, cmap="RdBu_r" if signed else "viridis",
                          norm=Normalize(vmin=-bound if signed else 0.0, vmax=bound))
        label = "M[i, j]"
    fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(title, fontsize=8)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
