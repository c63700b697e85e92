"""What several test modules share: prompts of ragged lengths and the independent reference.

No torch at import: the reading tests run where torch is not installed.
"""

from __future__ import annotations

from pathlib import Path

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


class Killed(BaseException):
    """What SIGKILL at a ``GDN_DUMP_FAULT`` point does to a run, in-process: nothing after it runs
    (a BaseException: no handler of the run catches it). tests/run/test_distributed.py kills real
    processes; this keeps the other kill tests fast."""


def kill_at(monkeypatch, point: str) -> None:
    """Make the run raise :class:`Killed` at fault point ``point`` (``after-create``,
    ``after-checkpoint:N``, ``before-finalize``), where ``GDN_DUMP_FAULT`` would SIGKILL it."""
    import gdn_dump.run.pipeline as pipeline
    import gdn_dump.run.session as session

    def fault(at):
        if at == point:
            raise Killed(at)

    monkeypatch.setattr(session, "fault", fault)
    monkeypatch.setattr(pipeline, "fault", fault)


def reference_cache(model, text: str):
    """TransformerLens ``run_with_cache`` of one prompt alone (the independent reference)."""
    import torch

    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids, use_cache=False)
    return ids[0], cache


def save_tiny_checkpoint(path: str | Path, multimodal: bool = True) -> Path:
    """Save ``tiny`` as a checkpoint directory, by default in the published multimodal layout.

    The multimodal form (``Qwen3_5ForConditionalGeneration`` with a vision tower of depth 1) is what
    real Qwen3.5 checkpoints look like, so loading it exercises the text-model extraction path.
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from gdn_dump.model.tiny import build_tiny_model

    path = Path(path)
    text_model, tokenizer = build_tiny_model()
    if multimodal:
        text_config = text_model.config.to_dict()
        vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                      out_hidden_size=text_model.config.hidden_size)
        config = Qwen3_5Config(text_config=text_config, vision_config=vision)
        model = Qwen3_5ForConditionalGeneration(config)
        model.model.language_model.load_state_dict(text_model.model.state_dict())
        model.lm_head.load_state_dict(text_model.lm_head.state_dict())
    else:
        model = text_model
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_same_prompts(reference, other) -> None:
    """Every prompt's rows of every array equal, bit for bit (layouts may differ by gaps)."""
    import numpy as np
    import zarr

    a = zarr.open_group(str(reference), mode="r")
    b = zarr.open_group(str(other), mode="r")
    assert b.attrs["gdn_dump"]["status"] == "complete"
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    assert list(a["prompt_id"][:]) == list(b["prompt_id"][:])
    np.testing.assert_array_equal(a["prompt_length"][:], b["prompt_length"][:])
    starts_a, starts_b, lengths = a["prompt_start"][:], b["prompt_start"][:], a["prompt_length"][:]
    axes = {"token": (starts_a, starts_b, lengths)}
    if "state_start" in a:  # the state axis: each prompt's snapshots, wherever its rows are
        np.testing.assert_array_equal(a["state_count"][:], b["state_count"][:])
        axes["state"] = (a["state_start"][:], b["state_start"][:], a["state_count"][:])
    for name, arr in a.arrays():
        axis = (arr.metadata.dimension_names or ("",))[0]
        if axis not in axes:
            continue
        x, y = arr[:], b[name][:]
        first_a, first_b, counts = axes[axis]
        for p, n in enumerate(counts):
            np.testing.assert_array_equal(x[first_a[p]:first_a[p] + n], y[first_b[p]:first_b[p] + n],
                                          err_msg=f"{name}, prompt {p}")


PEAK = """
import json, sys, torch
from pathlib import Path
from gdn_dump.model.load import load_model
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract

path, length, out, options = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
model = load_model(path, device="cpu")
torch.manual_seed(0)
prompts = out.parent / f"prompt-{length}.jsonl"
text = model.tokenizer.decode(torch.randint(10, 200, (length,)).tolist())
prompts.write_text(json.dumps({"text": text}) + "\\n")
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
base = kib("VmRSS")
result = extract(ExtractOptions(model=path, prompts=str(prompts), out=str(out), max_length=length,
                                force=True, **options), model=model)
print("PEAK", json.dumps({"above": kib("VmHWM") - base, "tokens": result.tokens}))
"""


def peak_above_model(path, length: int, out, **options) -> int:
    """Peak RSS (KiB) of ``extract`` of one prompt of ``length`` tokens, in a fresh process, above
    its RSS once the model at ``path`` is loaded; ``options``: more ExtractOptions fields."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", PEAK, str(path), str(length), str(out),
                          json.dumps(options)], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("PEAK ")), None)
    assert run.returncode == 0 and line, run.stderr[-3000:]
    peak = json.loads(line.removeprefix("PEAK "))
    assert peak["tokens"] == length, peak
    return peak["above"]


def estimated_kib(path, length: int, tmp: Path, **options) -> int:
    """The dry run's estimate (KiB) of what ``extract`` of one prompt of ``length`` tokens needs
    above the loaded model (forward, matrices, rows: what :func:`peak_above_model` measures)."""
    from gdn_dump.model.load import load_config
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract, plan_memory

    prompts = Path(tmp) / "estimate.txt"
    prompts.write_text("a short prompt\n", encoding="utf-8")
    opts = ExtractOptions(model=str(path), prompts=str(prompts), out=str(Path(tmp) / "dry.zarr"),
                          dry_run=True, device="cpu", **options)
    result = extract(opts)
    (estimate,) = plan_memory(opts, load_config(str(path)), result.plan, result.split, [length])
    return (estimate.host_bytes - estimate.weights) // 1024


def save_random_checkpoint(path: str | Path, seed: int = 1, **config) -> Path:
    """A random Qwen3.5 text checkpoint shaped like ``tiny`` but for ``config`` (e.g.
    ``linear_num_value_heads``, ``layer_types``), its norm weights random too (so that
    ``1 + w`` and the gated norm's ``w`` matter), saved at ``path``."""
    import torch
    from transformers import Qwen3_5ForCausalLM

    from gdn_dump.model.tiny import build_tiny_tokenizer, set_gates, tiny_text_config

    tokenizer = build_tiny_tokenizer()
    text_config = tiny_text_config(tokenizer)
    text_config.update(config)
    text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(text_config)
    set_gates(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0.0, 0.3)
    path = Path(path)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
