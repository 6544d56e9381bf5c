"""Data-parallel training with real processes (torchrun, gloo on CPU; no mock of torch.distributed): N ranks
sharing the global batch learn what one process learns with the whole batch, a job killed with 2 ranks resumes
with 1, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dblocks.checkpoint import load_checkpoint
from dblocks.data import load_image_dataset, save_prepared
from dblocks.metrics.fid import save_feature_net, train_feature_net
from dblocks.metrics.reference import FeatureSpace, reference_statistics
from tests import ddp_worker

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Two ranks reduce gradients in another order than one process sums a batch: float32 round-off, not drift
# (measured: at most 3e-8 after 20 steps of AdamW on weights of size ~0.5)
ATOL = 2e-5


def torchrun(nproc: int, *args: str, **kwargs) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *args]


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
    assert worst <= ATOL, f"{what}: differs by {worst:.3g} (tolerance {ATOL})"


def fid_inputs(root: Path) -> None:
    """A small digits feature net and its train / test reference statistics, as evaluation reads them."""
    for split in ("train", "test"):
        save_prepared(load_image_dataset("digits", split), root / "digits")
    train = load_image_dataset("digits", "train")
    save_feature_net(train_feature_net(train.images, train.labels, steps=20, seed=0), root / "net.safetensors")
    space = FeatureSpace.from_weights(root / "net.safetensors")
    for split in ("train", "test"):
        reference_statistics(root / "digits", split, space, root / f"{split}.safetensors")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    fid_inputs(out)
    proc = subprocess.run(
        torchrun(2, str(REPO / "tests/ddp_worker.py"), str(out)),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", list(ddp_worker.jobs()))
def test_two_ranks_with_half_the_batch_each_learn_what_one_process_learns(two_ranks, name):
    exp, method, block = ddp_worker.jobs()[name]
    one = ddp_worker.run(name, exp, method, block, torch.device("cpu"))
    two = load_file(str(two_ranks / f"{name}.safetensors"))
    assert_close(
        {k: v for k, v in two.items() if k != "losses"},
        {k: v for k, v in one.items() if k != "losses"},
        f"{name}: weights and weight average, 2 ranks vs 1",
    )
    # the logged loss is the whole global batch's, not rank 0's half
    assert torch.allclose(two["losses"], one["losses"], atol=1e-5), (two["losses"], one["losses"])


def test_sampling_dealt_over_two_ranks_gives_one_process_samples(two_ranks):
    two = load_file(str(two_ranks / "samples.safetensors"))["images"]
    one = ddp_worker.samples()
    assert two.shape == one.shape == (10, 1, 8, 8)
    assert torch.equal(two, one)  # same chunks, same noise, same arithmetic: bit for bit


def test_fid_evaluation_with_two_ranks_records_what_one_process_records(two_ranks):
    two = json.loads((two_ranks / "evaluation.json").read_text())
    one = ddp_worker.evaluation(two_ranks)
    assert two == json.loads(json.dumps(one))  # FIDs of both sample sets, block calls summed over the ranks
    assert len(two["fid_test_all"]) == 2 and two["fid_test"] > 0


def test_text_continuations_dealt_over_two_ranks_are_one_process_continuations(two_ranks):
    two = load_file(str(two_ranks / "continuations.safetensors"))
    one = ddp_worker.continuations()
    for kind in ("e2e", "blockwise"):  # top-p draws and block-wise denoising noise, per chunk
        assert two[kind].shape == one[kind].shape == (7, 4)
        assert torch.equal(two[kind], one[kind]), kind


# --------------------------------------------------------------------------- killed with 2 ranks, resumed with 1

JOB = (
    "train-block --arch ViT-micro --blocks 3 --block 2 --steps 60 --batch-size 16 "
    "--device cpu --no-progress --set train.warmup=5 --set train.log_every=5 --set "
    "train.checkpoint_every=3 --set train.ema_decay=0.9 --set train.augment=crop_flip"
).split()

# Every file under the test's directory that a rank other than 0 opens for writing, recorded from inside it
# (Python's audit hook on open; libraries probing /dev/null or the temp dir at import are not the job's files)
WRITES_SPY = textwrap.dedent("""
    import os, sys
    if os.environ.get("RANK", "0") != "0":
        _log = os.environ["WRITES_LOG"] + "." + os.environ["RANK"]
        _root = os.path.dirname(os.environ["WRITES_LOG"])
        def _spy(event, args):
            if event == "open" and args[0] is not None and not isinstance(args[0], int):
                mode, flags = args[1], args[2]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
                          (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                path = os.path.abspath(os.fsdecode(os.fspath(args[0])))
                if writing and path.startswith(_root) and not path.startswith(_log):
                    with open(_log, "a") as f:
                        f.write(path + "\\n")
        sys.addaudithook(_spy)
""")


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _state_step(out: Path) -> int:
    try:
        return json.loads(out.with_suffix(".state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_two_rank_job_killed_then_resumed_with_one_rank_matches_one_uninterrupted_rank(tmp_path):
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(WRITES_SPY)
    env = {**ENV, "PYTHONPATH": f"{spy}{os.pathsep}{ENV.get('PYTHONPATH', '')}", "WRITES_LOG": str(tmp_path / "writes")}
    # the spy sees a write by a rank other than 0 (then its record is removed)
    subprocess.run(
        [sys.executable, "-c", f"open({str(tmp_path / 'probe')!r}, 'w')"], env={**env, "RANK": "1"}, check=True
    )
    assert (tmp_path / "writes.1").read_text().split() == [str(tmp_path / "probe")]
    (tmp_path / "writes.1").unlink()
    reference = tmp_path / "reference" / "block-2.safetensors"
    ref = subprocess.Popen(
        [str(BIN / "dblocks"), *JOB, "--out", str(reference)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    work = tmp_path / "work"
    work.mkdir()
    out = work / "block-2.safetensors"
    # the whole job (torchrun and both ranks) dies at once, as when a node fails or SLURM kills the job
    job = subprocess.Popen(
        torchrun(2, "-m", "dblocks", *JOB, "--out", str(out)),
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    while _state_step(out) < 9:
        assert job.poll() is None, f"the job ended before step 9: {job.communicate()[0][-3000:]}"
        assert time.time() < deadline, "no resume state after 180 s"
        time.sleep(0.01)
    for pid in _descendants(job.pid):
        os.kill(pid, signal.SIGKILL)
    job.wait(timeout=30)
    killed_at = _state_step(out)
    assert not out.exists() and killed_at < 60

    resumed = subprocess.run(
        [str(BIN / "dblocks"), *JOB, "--out", str(out)], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stdout, stderr = ref.communicate(timeout=300)
    assert ref.returncode == 0, stderr[-3000:]

    got, meta = load_checkpoint(out)
    want, _ = load_checkpoint(reference)
    assert meta["resumed_from"] >= killed_at > 0, resumed.stdout + resumed.stderr
    assert any(k.startswith("ema/") for k in want)
    assert_close(got, want, "killed with 2 ranks, resumed with 1, vs 1 rank uninterrupted")
    # only rank 0 wrote: rank 1 opened nothing for writing, and the tree holds what one process leaves
    assert not list(tmp_path.glob("writes.*")), [p.read_text() for p in tmp_path.glob("writes.*")]
    assert sorted(p.name for p in work.iterdir()) == ["block-2.json", "block-2.safetensors"]


def test_a_global_batch_smaller_than_the_ranks_is_refused_before_training(tmp_path):
    job = JOB[: JOB.index("--batch-size") + 1] + ["1"] + JOB[JOB.index("--batch-size") + 2 :]
    proc = subprocess.run(
        torchrun(2, "-m", "dblocks", *job, "--out", str(tmp_path / "block-2.safetensors")),
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "train.batch_size=1 is the global batch, shared by 2 ranks; allowed: at least 2" in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
