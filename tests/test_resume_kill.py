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
# the paper recipes' state rides along (augment, ema_decay): per-batch augmentation draws and the weight average
JOB = (
    "train-block --arch ViT-micro --blocks 3 --block 2 --steps 60 --batch-size 16 "
    "--device cpu --no-progress --set train.warmup=5 --set train.log_every=5 --set "
    "train.checkpoint_every=3 --set train.augment=randaugment --set "
    "train.ema_decay=0.9"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _job(out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [DBLOCKS, *JOB, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kwargs
    )


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


LOCAL_JOB = (
    "train-local --method noprop-dt --arch NoProp-tiny --blocks 10 --block 4 --steps "
    "60 --batch-size 16 --device cpu --no-progress --set train.warmup=0 --set "
    "train.grad_clip=null --set train.log_every=5 --set train.checkpoint_every=3"
).split()


def test_a_killed_noprop_block_job_resumes_bit_identically(tmp_path, monkeypatch):
    """The block-local baselines train through the same loop: a NoProp-DT block job (batch norm statistics
    included) killed mid-run resumes from its state and ends with the uninterrupted run's weights."""
    monkeypatch.setattr(sys.modules[__name__], "JOB", LOCAL_JOB)
    rng = random.Random(random.randrange(10**6))
    reference = tmp_path / "reference" / "block-4.safetensors"
    reference.parent.mkdir()
    ref = _job(reference)
    out = tmp_path / "killed" / "block-4.safetensors"
    out.parent.mkdir()
    killed_at = _kill_after(out, rng.randrange(6, 40), rng)
    final = _job(out)
    assert final.communicate(timeout=300) and final.returncode == 0
    assert ref.communicate(timeout=300) and ref.returncode == 0
    resumed, meta = load_checkpoint(out)
    expected, _ = load_checkpoint(reference)
    assert meta["resumed_from"] >= killed_at and meta["part"] == "block-4" and meta["kind"] == "local"
    assert resumed.keys() == expected.keys() and any("running_mean" in k for k in expected)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert sorted(p.name for p in out.parent.iterdir()) == ["block-4.json", "block-4.safetensors"]
