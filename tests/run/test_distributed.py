"""Many processes, one store; killed runs resumed; signals. Every run is a real subprocess.

All processes run with one thread (what torchrun sets): the CPU kernels' float reductions depend
on the thread count, and the claim tested is bit-identical rows, prompt by prompt.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from ..helpers import assert_same_prompts

WORDS = ["alpha", "b", "gamma delta", "é", "zz", "the quick"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = ["--model", "tiny", "--dtype", "float32", "--sort-window", "20KiB", "--chunk-tokens", "64",
          "--checkpoint-every", "0", "--hooks", "q,v,beta,log_decay,recurrence_out", "-q"]


def _prompts(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
                              for _ in range(n)) + "\n", encoding="utf-8")
    return path


def _cmd(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gdn_dump", "extract", "--prompts", str(prompts), "--out", str(out),
            *COMMON, *extra]


def _run(args, env=None, check=True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=300, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {done.stderr[-2000:]}")
    return done


def _status(out: Path) -> str:
    return zarr.open_group(str(out), mode="r").attrs["gdn_dump"]["status"]


def _record(out: Path, region: int) -> dict | None:
    path = out / "_progress" / f"region-{region:05d}" / "zarr.json"
    return json.loads(path.read_text())["attributes"] if path.exists() else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    prompts = _prompts(root / "p.txt", 60)
    out = root / "one.zarr"
    _run(_cmd(prompts, out))
    return prompts, out


def test_torchrun_two_processes_write_one_store_equal_to_one_process(reference, tmp_path):
    prompts, one = reference
    out = tmp_path / "two.zarr"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "gdn_dump", "extract", "--prompts", str(prompts), "--out", str(out), *COMMON])
    meta = zarr.open_group(str(out), mode="r").attrs["gdn_dump"]
    assert meta["processes"]["launcher"] == "torchrun" and meta["processes"]["count"] == 2
    regions = meta["processes"]["regions"]
    assert all(hi > lo for lo, hi in regions)  # both did work
    assert_same_prompts(one, out)


def test_three_array_tasks_started_together(reference, tmp_path):
    prompts, one = reference
    out = tmp_path / "three.zarr"
    procs = [subprocess.Popen(_cmd(prompts, out, "--shard", f"{i}/3"), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (2, 1, 0)]  # process 0 last: the others wait for it to create the store
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    regions = zarr.open_group(str(out), mode="r").attrs["gdn_dump"]["processes"]["regions"]
    assert len(regions) == 3 and all(hi > lo for lo, hi in regions)
    # regions start on chunk boundaries: no two processes share a chunk
    starts = zarr.open_group(str(out), mode="r")["prompt_start"][:]
    assert all(starts[lo] % 64 == 0 for lo, _ in regions)
    assert_same_prompts(one, out)


def test_killed_run_resumes_to_the_same_store(reference, tmp_path):
    """A real SIGKILL mid-region (the other fault points are killed in-process, in
    tests/run/test_resume_counts.py)."""
    prompts, one = reference
    out = tmp_path / "killed.zarr"
    killed = _run(_cmd(prompts, out), env={"GDN_DUMP_FAULT": "after-checkpoint:3"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert _status(out) == "in_progress"
    record = _record(out, 0)  # mid-region: resume starts after the recorded units
    assert not record["done"] and 0 < record["resume_from"] < 60
    _run(_cmd(prompts, out, "--resume"))
    assert_same_prompts(one, out)
    again = _run(_cmd(prompts, out, "--resume"))  # resuming a complete store changes nothing
    assert again.returncode == 0 and _status(out) == "complete"


def test_killed_shard_resumes_and_the_last_one_finalizes(reference, tmp_path):
    prompts, one = reference
    out = tmp_path / "shards.zarr"
    _run(_cmd(prompts, out, "--shard", "0/2"))
    _run(_cmd(prompts, out, "--shard", "1/2"), env={"GDN_DUMP_FAULT": "after-checkpoint:2"},
         check=False)
    assert _status(out) == "in_progress"
    finalize = _run([sys.executable, "-m", "gdn_dump", "finalize", str(out)], check=False)
    assert finalize.returncode == 1 and "not finished: 1" in finalize.stderr
    _run(_cmd(prompts, out, "--shard", "1/2", "--resume"))
    assert_same_prompts(one, out)
    assert _run([sys.executable, "-m", "gdn_dump", "finalize", str(out)]).returncode == 0  # idempotent
    assert _status(out) == "complete"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_flushes_records_and_resumes(reference, tmp_path, sig, code):
    prompts, one = reference
    out = tmp_path / "sig.zarr"
    proc = subprocess.Popen(_cmd(prompts, out), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _record(out, 0) is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == code, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    assert _status(out) == "in_progress"
    assert not _record(out, 0)["done"]
    _run(_cmd(prompts, out, "--resume"))
    assert_same_prompts(one, out)
