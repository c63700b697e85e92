"""Figures of a store (matplotlib, headless): attention heatmaps (``attn-matrix --png``) and the
figures of ``gdn-dump plot`` (decay, beta, attn, norms, state; their data is in :mod:`gdn_dump.read.figures`;
contrib, logit: :mod:`gdn_dump.read.attribution`).

Drawn with matplotlib's object API (a ``Figure`` on its own Agg canvas), never through pyplot:
plotting from a notebook leaves its backend, its open figures and pyplot's state as they were.
Like the data, the figures show only finished prompts (see :mod:`gdn_dump.read.figures`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..catalogue import CONTRIBUTION_NORM, LOGITS_NEXT, is_matrix
from ..errors import GdnDumpError

ANNOTATE_MAX_CELLS = 200  # values written into heatmap cells up to this many cells
LABEL_MAX_TOKENS = 48  # token strings on the axes only where they stay readable
ANNOTATE_MAX_COLUMNS = 24  # logit: values written into cells only while they fit


def _canvas():
    """matplotlib's Agg canvas class (an ImportError as the one-line hint to install it)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise GdnDumpError("figures need matplotlib: pip install 'gdn-dump[plot]'") from None
    return FigureCanvasAgg


def _figure(size, dpi):
    """A new figure of ``size`` inches (a side, or a (width, height) pair) on its own Agg canvas:
    not one of pyplot's figures, so nothing to close and no backend chosen."""
    from matplotlib.figure import Figure

    figsize = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    fig = Figure(figsize=figsize, dpi=dpi)
    _canvas()(fig)
    return fig


def token_labels(tokenizer, token_ids) -> list[str]:
    """One readable string per token (byte-level pieces decoded, whitespace made visible)."""
    labels = []
    for token in token_ids:
        text = tokenizer.decode([int(token)])
        labels.append(text.replace("\n", "\\n").replace(" ", "\u2423") or "\u2205")
    return labels


def attention_heatmaps(store, out_dir: str | Path, tokenizer=None, *, max_prompts: int = 4,
                       log_scale: bool = False, size_inches: float = 6.0, dpi: int = 100) -> list[Path]:
    """One PNG per (prompt, layer, head) for the first ``max_prompts`` finished prompts of a store
    (a :class:`~gdn_dump.read.reader.Store`, a path or an open group)."""
    from .figures import as_store

    _canvas()
    store = as_store(store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [name for name in store.matrices if is_matrix(name)]
    written = []
    for p in store.visible[:max_prompts]:
        p = int(p)
        rows = store.rows(p)
        n = rows.stop - rows.start
        if n == 0:
            continue
        tokens = store["tokens"][rows]
        labels = token_labels(tokenizer, tokens) if tokenizer is not None and n <= LABEL_MAX_TOKENS else None
        for name in names:
            arr = store[name]
            heads = arr.attrs.get("heads", list(range(arr.shape[1])))
            block = arr[p, :, :n, :n]
            for i, head in enumerate(heads):
                path = out / f"prompt{p}_{name.replace('.', '_')}_head{head}.png"
                _heatmap(block[i], labels, path, log_scale, size_inches, dpi,
                         f"{name} head {head} ({arr.attrs.get('kind')}), prompt {store.prompt_ids[p]}")
                written.append(path)
    return written


ATTENTION_TEXT = ("M[i, j]", ("key position j", "query position i"))  # value, (x, y) labels
CONTRIBUTION_TEXT = ("||c[i, j]||", ("source token j", "position i"))  # contrib's


def _heatmap(matrix, labels, path, log_scale, size_inches, dpi, title, fmt=None, text=ATTENTION_TEXT):
    """One lower-triangular heatmap; ``size_inches`` is a side (square) or a (width, height) pair;
    ``text``: what a value is, and the (x, y) axis labels."""
    from matplotlib.colors import LogNorm

    value_label, axes = text
    fig = _figure(size_inches, dpi)
    ax = fig.subplots()
    lower = np.tril(np.ones_like(matrix, dtype=bool))
    if log_scale:
        magnitude = np.where(lower, np.abs(matrix), np.nan)
        positive = magnitude[magnitude > 0]
        vmin = float(positive.min()) if positive.size else 1e-12
        image = ax.imshow(magnitude, norm=LogNorm(vmin=vmin, vmax=max(vmin * 10, float(np.nanmax(magnitude)))),
                          cmap="viridis")
        label = f"|{value_label}| (log)"
    else:
        shown = np.where(lower, matrix, np.nan)
        image = ax.imshow(shown, **_colours(shown))
        label = value_label
    fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title, fontsize=8)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    _save(fig, path, fmt)


def _colours(values, signed: bool | None = None) -> dict:
    """imshow's ``cmap`` and ``norm``: a diverging map centred at 0 for signed values (or when
    ``signed``), viridis from 0 otherwise; NaN cells are ignored."""
    from matplotlib.colors import Normalize

    values = np.asarray(values, dtype=np.float64)
    some = bool(np.isfinite(values).any())
    bound = (float(np.nanmax(np.abs(values))) if some else 0.0) or 1.0
    if signed is None:
        signed = some and bool(np.nanmin(values) < 0)
    return {"cmap": "RdBu_r" if signed else "viridis",
            "norm": Normalize(vmin=-bound if signed else 0.0, vmax=bound)}


# ---------------------------------------------------------------------------------------------
# gdn-dump plot: one figure per command (the data comes from gdn_dump.read.figures)

def plot_store(store, kind: str, out: str | Path, *, layer: int | None = None, head: int | None = None,
               prompt: int | None = None, hook: str = "recurrence_out", width: float = 10.0,
               height: float = 6.0, dpi: int = 100, name: str | None = None,
               query: int | None = None) -> Path:
    """Draw one figure of a store (a :class:`~gdn_dump.read.reader.Store`, a path or URL, or an
    open group) into ``out``; returns the path. Only finished prompts are shown. ``name`` is the
    store as the titles call it (default: its path). ``query``: the position whose prediction
    ``kind="logit"`` explains (default: the prompt's last one with a target); other kinds ignore it."""
    from . import attribution, figures

    if kind not in figures.KINDS:
        raise GdnDumpError(f"--kind {kind!r} is unknown: one of {', '.join(figures.KINDS)}")
    if min(width, height) <= 0 or dpi <= 0:
        raise GdnDumpError("--width, --height and --dpi must be positive")
    out = Path(out)
    if not out.parent.is_dir():
        raise GdnDumpError(f"--out {out}: the directory {out.parent} does not exist")
    if out.is_dir():
        raise GdnDumpError(f"--out {out} is a directory; give a file name such as {out / (kind + '.png')}")
    fmt = out.suffix.lstrip(".").lower() or "png"
    supported = _canvas().get_supported_filetypes()
    if fmt not in supported:
        raise GdnDumpError(f"--out {out}: unknown image format {fmt!r}; use .png (or {', '.join(sorted(supported))})")
    store = figures.as_store(store)
    name = name or store.path
    size = (width, height)
    if kind == "attn":
        data = figures.attention_data(store, layer, 0 if head is None else head, 0 if prompt is None else prompt)
        draw_attention(data, store.tokenizer, out, size, dpi, fmt)
    elif kind == "contrib":
        data = attribution.contribution_data(store, layer, head, 0 if prompt is None else prompt)
        draw_attention(data, store.tokenizer, out, size, dpi, fmt)
    elif kind == "logit":
        data = attribution.logit_data(store, layer, head, 0 if prompt is None else prompt, query)
        draw_logit(data, store.tokenizer, out, size, dpi, fmt, name)
    elif kind == "state":
        data = figures.state_data(store, layer, head, prompt)
        draw_states(data, out, size, dpi, fmt, name)
    elif kind == "norms":
        data = figures.norm_profile(store, hook, layer, head, prompt)
        _need_rows({"rows": int(data["count"].sum())}, prompt)
        draw_norms(data, out, size, dpi, fmt, f"{name}: {_scope(prompt, layer)}")
    elif layer is None and head is None:
        data = figures.quantile_grid(store, kind, prompt)
        _need_rows(data, prompt)
        draw_grid(data, out, size, dpi, fmt, f"{name}: {_scope(prompt, None)}")
    else:
        data = figures.distributions(store, kind, layer, head, prompt)
        _need_rows(data, prompt)
        draw_distributions(data, out, size, dpi, fmt, f"{name}: {_scope(prompt, layer)}")
    return out


def _scope(prompt, layer) -> str:
    what = "all prompts" if prompt is None else f"prompt {prompt}"
    return what if layer is None else f"layer {layer}, {what}"


def _need_rows(data, prompt) -> None:
    if not data["rows"]:
        raise GdnDumpError("no stored tokens to plot" + ("" if prompt is None else f" in --prompt {prompt}"))


def _rows_note(data) -> str:
    note = f"{data['rows']:,} tokens"
    return note + (f", every {math.ceil(data['rows'] / data['sampled'])}th used"
                   if data["sampled"] < data["rows"] else "")


def _save(fig, path, fmt) -> None:
    fig.tight_layout()
    fig.savefig(path, format=fmt)


def _heads_ticks(ax, n: int, axis: str) -> None:
    if n <= 48:
        (ax.set_yticks if axis == "y" else ax.set_xticks)(range(n))


GRID_TEXT = {
    "decay": ("half-life ln(0.5)/g per value head and GDN layer", "median half-life (tokens, log scale)",
              "inter-quartile spread: log10(q75 / q25) (decades)"),
    "beta": ("write strength beta per value head and GDN layer", "median beta",
             "inter-quartile range: q75 - q25"),
}


def draw_grid(data, path, size, dpi, fmt, title) -> None:
    """Two heatmaps, heads x GDN layers: the median (annotated when small) and the IQR."""
    from matplotlib.colors import LogNorm, Normalize

    kind, median = data["kind"], data["median"]
    heads, n_layers = median.shape
    what, median_label, spread_label = GRID_TEXT[kind]
    if kind == "decay":
        positive = median[np.isfinite(median) & (median > 0)]
        low = float(positive.min()) if positive.size else 1.0
        norm = LogNorm(vmin=low, vmax=max(low * 10, float(positive.max()) if positive.size else 10.0))
        spread = np.log10(data["q75"] / data["q25"])
    else:
        norm = Normalize(vmin=0.0, vmax=1.0)
        spread = data["q75"] - data["q25"]
    fig = _figure(size, dpi)
    left, right = fig.subplots(1, 2)
    for ax, values, label, kw in ((left, median, median_label, {"norm": norm, "cmap": "viridis"}),
                                  (right, spread, spread_label, {"cmap": "magma"})):
        image = ax.imshow(values, aspect="auto", interpolation="nearest", **kw)
        fig.colorbar(image, ax=ax, label=label)
        ax.set_xticks(range(n_layers), [str(layer) for layer in data["layers"]])
        _heads_ticks(ax, heads, "y")
        ax.set_xlabel("GDN layer")
        ax.set_ylabel("value head")
        if heads * n_layers <= ANNOTATE_MAX_CELLS:
            for (h, i), value in np.ndenumerate(values):
                ax.text(i, h, f"{value:.3g}", ha="center", va="center", fontsize=7, color="white",
                        path_effects=_outline())
    left.set_title("median")
    right.set_title("spread")
    fig.suptitle(f"{what}\n{title} ({_rows_note(data)})", fontsize=9)
    _save(fig, path, fmt)


def _outline():
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=1.5, foreground="black")]


def draw_distributions(data, path, size, dpi, fmt, title) -> None:
    """Box plots (5-95 % whiskers, median line, mean marker) per head of a layer or per layer."""
    fig = _figure(size, dpi)
    ax = fig.subplots()
    ax.boxplot(data["values"], tick_labels=[str(x) for x in data["labels"]], whis=(5, 95),
               showfliers=False, showmeans=True)
    if data["axis"] == "head":
        ax.set_xlabel("value head")
        subject = f"per head of layer {data['layer']}"
    else:
        ax.set_xlabel("GDN layer")
        subject = f"of head {data['head']} per GDN layer"
    ax.set_ylabel("log10 half-life (tokens)" if data["kind"] == "decay" else "beta (write strength)")
    what = "half-life ln(0.5)/g" if data["kind"] == "decay" else "beta"
    ax.set_title(f"{what} {subject} (box: quartiles, whiskers: 5-95 %)\n{title} ({_rows_note(data)})",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, fmt)


def draw_norms(data, path, size, dpi, fmt, title) -> None:
    """One line per layer (or head) of the mean norm at each position; grey: prompts counted."""
    fig = _figure(size, dpi)
    ax = fig.subplots()
    positions = np.arange(data["mean"].shape[1])
    marker = "o" if len(positions) < 2 else None
    for label, line in zip(data["labels"], data["mean"]):
        ax.plot(positions, line, label=label, marker=marker, linewidth=1.2)
    ax.set_xlabel("position t (tokens)")
    ax.set_ylabel(f"mean over prompts of ||{data['hook']}[t]|| (L2)")
    ax.set_title(f"norm profile of {data['hook']}\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    count = ax.twinx()
    count.step(positions, data["count"], where="mid", color="grey", alpha=0.4, linewidth=1)
    count.set_ylabel("prompts reaching t", color="grey")
    count.set_ylim(bottom=0)
    ax.set_zorder(count.get_zorder() + 1)  # the lines above the count
    ax.patch.set_visible(False)
    ax.legend(fontsize=7, ncol=max(1, len(data["labels"]) // 12), loc="upper right")
    _save(fig, path, fmt)


def draw_states(data, path, size, dpi, fmt, name) -> None:
    """Three panels: per head, the Frobenius norm and the effective rank of S_t along the
    snapshot positions, and the singular values of the last snapshot."""
    fig = _figure(size, dpi)
    norm_ax, rank_ax, spectrum_ax = fig.subplots(1, 3)
    positions = data["positions"]
    marker = "o" if len(positions) < 16 else None  # a few snapshots: show where they are
    for i, head in enumerate(data["heads"]):
        label = f"head {head}"
        norm_ax.plot(positions, data["norm"][:, i], label=label, marker=marker, linewidth=1.2)
        rank_ax.plot(positions, data["rank"][:, i], label=label, marker=marker, linewidth=1.2)
        spectrum = data["spectrum"][i]
        spectrum_ax.plot(np.arange(1, len(spectrum) + 1), spectrum, label=label, linewidth=1.2)
    for ax, ylabel in ((norm_ax, "||S_t||_F"), (rank_ax, "effective rank of S_t")):
        ax.set_xlabel("position t (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    norm_ax.set_title("Frobenius norm", fontsize=9)
    rank_ax.set_title("effective rank exp(H(sigma / sum sigma))", fontsize=9)
    spectrum_ax.set_yscale("log")
    spectrum_ax.set_xlabel("index i")
    spectrum_ax.set_ylabel("singular value sigma_i")
    spectrum_ax.set_title(f"spectrum at t = {int(positions[-1])} (last snapshot)", fontsize=9)
    spectrum_ax.grid(alpha=0.3)
    if len(data["heads"]) <= 16:
        rank_ax.legend(fontsize=7, ncol=max(1, len(data["heads"]) // 8))
    fig.suptitle(f"recurrent state of layer {data['layer']}, prompt {data['prompt']} "
                 f"(id {data['prompt_id']}, {len(positions)} snapshots)\n{name}", fontsize=9)
    _save(fig, path, fmt)


def _token_axis(tokenizer, tokens) -> list[str] | None:
    """Axis labels for ``tokens``: their strings (token ids without a tokenizer), or None when
    there are too many to read."""
    if len(tokens) > LABEL_MAX_TOKENS:
        return None
    return token_labels(tokenizer, tokens) if tokenizer is not None else [str(int(t)) for t in tokens]


def draw_attention(data, tokenizer, path, size, dpi, fmt) -> None:
    """The heatmap of one head's matrix (an attention matrix, or ``||c_{h,i,j}||`` for
    ``contrib``), axes labelled with the prompt's tokens."""
    tokens = data["tokens"]
    contribution = data["kind"] == CONTRIBUTION_NORM
    what = "how much source token j writes into position i" if contribution else data["kind"]
    title = (f"{data['name']} head {data['head']} ({what}), "
             f"prompt {data['prompt']} (id {data['prompt_id']}, {len(tokens)} tokens)"
             + ("" if tokenizer is not None else "; labels are token ids"))
    _heatmap(data["matrix"], _token_axis(tokenizer, tokens), path, False, size, dpi, title,
             fmt=fmt, text=CONTRIBUTION_TEXT if contribution else ATTENTION_TEXT)


def draw_logit(data, tokenizer, path, size, dpi, fmt, name) -> None:
    """Which source tokens pushed the prediction at one position: a heatmap of the direct logit
    attribution per layer (or head) and source token, diverging around 0, and below it the
    bars of their sum."""
    values, total, query = data["values"], data["total"], data["query"]
    keys = np.arange(query + 1)
    fig = _figure(size, dpi)
    (heat, bar_of_colours), (bars, spare) = fig.subplots(
        2, 2, gridspec_kw={"width_ratios": [40, 1], "height_ratios": [3, 1]})
    image = heat.imshow(values, aspect="auto", interpolation="nearest", **_colours(values, signed=True))
    fig.colorbar(image, cax=bar_of_colours, label="direct logit attribution")
    spare.axis("off")
    heat.set_yticks(range(len(data["labels"])), data["labels"], fontsize=7)
    heat.set_ylabel("layer" if data["axis"] == "layer" else f"head of layer {data['layers'][0]}")
    if values.size <= ANNOTATE_MAX_CELLS and len(keys) <= ANNOTATE_MAX_COLUMNS:
        for (r, j), value in np.ndenumerate(values):
            heat.text(j, r, f"{value:.2g}", ha="center", va="center", fontsize=6)
    bars.bar(keys, total, color=np.where(total >= 0, "#b2182b", "#2166ac"))
    bars.axhline(0.0, color="black", linewidth=0.6)
    bars.set_xlim(heat.get_xlim())
    bars.set_ylabel("sum", fontsize=8)
    bars.set_xlabel("source token j")
    labels = _token_axis(tokenizer, data["tokens"][:query + 1])
    heat.tick_params(axis="x", labelbottom=False)  # the bars below carry the tokens
    if labels is not None:
        heat.set_xticks(keys)
        bars.set_xticks(keys, labels, rotation=90, fontsize=6)
    target = data["target_token"]
    shown = _token_axis(tokenizer, [target])
    what = f"next token {shown[0]!r}" if data["target"] == LOGITS_NEXT else f"token {target} ({shown[0]!r})"
    at = _token_axis(tokenizer, data["tokens"][query:query + 1])
    rows = (f"per head of layer {data['layers'][0]}" if data["axis"] == "head" else
            f"head {data['head']}, per layer" if data["head"] is not None else
            "summed over the stored heads, per layer")
    fig.suptitle(f"which source tokens pushed the logit of the {what} at position {query} "
                 f"({at[0]!r}): direct logit attribution, {rows}\n"
                 f"prompt {data['prompt']} (id {data['prompt_id']}, {len(data['tokens'])} tokens), "
                 f"{name}" + ("" if tokenizer is not None else "; labels are token ids"), fontsize=8)
    _save(fig, path, fmt)
