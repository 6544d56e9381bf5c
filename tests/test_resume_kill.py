"""A block job killed with SIGKILL at a random point (twice) and rerun finishes with weights (raw and averaged)
bit-identical to an uninterrupted run with the same seed, and its rerun does not start again from step 0."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dblocks.checkpoint import load_checkpoint

DBLOCKS = str(Path(sys.executable).parent / "dblocks")
JOB = ["train-block", "--arch", "ViT-micro", "--blocks", "3", "--block", "2", "--steps", "60", "--batch-size", "16",
       "--device", "cpu", "--no-progress", "--set", "train.warmup=5", "--set", "train.log_every=5",
       "--set", "train.checkpoint_every=3",
       # the paper recipes' state rides along: per-batch augmentation draws and the weight average
       "--set", "train.augment=randaugment", "--set", "train.ema_decay=0.9"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _job(out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([DBLOCKS, *JOB, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, **kwargs)


def _state_step(out: Path) -> int:
    try:
        return json.loads(out.with_suffix(".state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _kill_after(out: Path, step: int, rng: random.Random) -> int:
    """Start the job, SIGKILL it a random few milliseconds after its saved state reaches ``step``."""
    proc = _job(out)
    deadline = time.time() + 120
    while _state_step(out) < step:
        assert proc.poll() is None, f"the job ended before step {step}: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))  # anywhere: mid-step, mid-state-write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return _state_step(out)


def test_sigkill_at_random_steps_then_rerun_is_bit_identical(tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    reference = tmp_path / "reference" / "block-2.safetensors"
    reference.parent.mkdir()
    ref = _job(reference)
    out = tmp_path / "killed" / "block-2.safetensors"
    out.parent.mkdir()

    first = _kill_after(out, rng.randrange(3, 25), rng)
    second = _kill_after(out, rng.randrange(first + 3, 50), rng)  # the rerun resumed, then died again
    assert not out.exists(), f"seed {seed}: a killed job left a final checkpoint"
    assert second > first

    final = _job(out)
    stdout, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err

    resumed, meta = load_checkpoint(out)
    expected, _ = load_checkpoint(reference)
    assert meta["resumed_from"] >= second, f"seed {seed}: the rerun started over"
    assert resumed.keys() == expected.keys() and any(k.startswith("ema/") for k in expected)
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), f"seed {seed}: {name} differs after resuming"
    assert not out.with_suffix(".state.safetensors").exists()  # the resume state goes once the block is done
    assert sorted(p.name for p in out.parent.iterdir()) == ["block-2.json", "block-2.safetensors"]
