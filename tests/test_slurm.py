"""`snakemake --profile slurm` against a real SLURM cluster (munged + slurmctld + slurmd on loopback, started
by tests/slurm/cluster.py from the Debian packages that tests/slurm/install.sh installs).

One micro pipeline (3 blocks of a ViT-micro) goes through sbatch twice with the repository's own profile;
only the cluster-specific settings (partition, no account, squeue status checks, short waits) are given
on the command line, as a site would. In the first run block 3 is made to fail on purpose (its resume state
is corrupt) and block 2 is killed with scancel mid-training; the second run, after the corrupt state is
removed, must run only block 3 and what depends on it. What ran is checked with SLURM itself: every job's
record from `scontrol show job` (state, exit code, GPU request, task count, time limit) and the job's own
SLURM output file, which names its rule and wildcards. The jobs of seconds (the Snakefile's `localrules`:
tracking records, assembly, tables, provenance) are never submitted: Snakemake's own output shows them run
on the submitting machine.

The micro experiment's training jobs ask for 2 GPUs (`resources.experiments`), so each is one SLURM job of
one task holding 2 GPUs in which torchrun starts 2 data-parallel ranks (on the CPU: the cluster's GPUs are
count-only); its evaluation asks for one GPU. The cluster has 4, so two block jobs still run side by side.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dblocks.checkpoint import load_metadata
from dblocks.pipeline import Pipeline
from tests.slurm.cluster import PARTITION, LocalCluster, die_with_parent, require_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROFILE = REPO / "profiles/slurm"
EXP = "vit-cifar100"
STEPS, CHECKPOINT_EVERY = 400, 50  # ~6 s of training: scancel lands after the first checkpoint, before the end
RANKS = 2  # GPUs, hence data-parallel ranks, of each training job
MICRO = f"""
scale: tiny
tracking: {{uri: "sqlite:///mlflow.db", experiment: micro-slurm}}
resources: {{gpu: 1, mem_mb: 1000, runtime: 10, threads: 1, experiments: {{{EXP}: {{gpu: {RANKS}}}}}}}
evaluation: {{samples: 40, sample_steps: 6, fid_features: digits}}
defaults: {{dataset: digits, seed: 0, device: cpu}}
experiments:
  {EXP}:
    task: classification
    arch: ViT-micro
    blocks: 3
    train: {{steps: {STEPS}, batch_size: 16, warmup: 1, log_every: 50, checkpoint_every: {CHECKPOINT_EVERY}}}
    pipeline: {{tables: ["1"], methods: [blockwise]}}
"""
# What a site sets for this one-node cluster; everything else comes from profiles/slurm.
SITE = [
    "--default-resources",
    f"slurm_partition={PARTITION}",
    "mem_mb=500",
    "runtime=10",
    "--slurm-no-account",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "8",
    "--latency-wait",
    "5",
    "--retries",
    "1",
]  # the profile's 2 work the same way; one retry keeps the suite short
RUN_TIMEOUT = 300


def block(b: int) -> str:
    return f"checkpoints/tiny/{EXP}/block-{b}.safetensors"


def state(b: int) -> str:
    return f"checkpoints/tiny/{EXP}/block-{b}.state.safetensors"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Not root, or SLURM not installed: skip with the reason (`pytest -ra` prints it); under CI=true, fail.
    require_cluster()
    # SIGTERM (e.g. a CI timeout) becomes KeyboardInterrupt, so pytest still tears the cluster down;
    # SIGKILL is covered by the daemons' parent-death signal.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with LocalCluster(tmp_path_factory.mktemp("slurm-cluster"), gpus=2 * RANKS) as running:
            yield running
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_snakemake(cluster: LocalCluster, work: Path, name: str) -> tuple[subprocess.Popen, Path]:
    env = dict(
        cluster.env, PATH=f"{BIN}{os.pathsep}{cluster.env.get('PATH', '')}", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    log = work / f"snakemake-{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "snakemake"),
                "-s",
                str(REPO / "Snakefile"),
                "--profile",
                str(PROFILE),
                "--config",
                "params=micro.yaml",
                *SITE,
            ],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"snakemake did not finish in {timeout} s:\n{log.read_text()[-4000:]}") from None


def training_processes(cluster: LocalCluster, b: int) -> list[dict[str, str]]:
    """The environments of the processes now training block ``b`` on this cluster (torchrun and its ranks)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = dict(
                v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v
            )
        except OSError:
            continue
        if (
            b"train-block" in cmd
            and [b"--block", str(b).encode()] in [cmd[i : i + 2] for i in range(len(cmd))]
            and environ.get(b"SLURM_CONF", b"").decode() == cluster.env["SLURM_CONF"]
        ):
            found.append({k.decode(): v.decode() for k, v in environ.items()})
    return found


def training_job_of(cluster: LocalCluster, b: int) -> str:
    """The SLURM job id of the process now training block ``b`` on this cluster (read from its environment)."""
    for environ in training_processes(cluster, b):
        return environ["SLURM_JOB_ID"]
    raise LookupError(f"no process trains block {b}")


RANK_ENV = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_GPUS_ON_NODE", "WORLD_SIZE")


def ranks_of(cluster: LocalCluster, b: int) -> dict[str, tuple] | None:
    """{RANK: its SLURM job, job step, task, the step's task count and GPUs, WORLD_SIZE} of the ranks training
    block ``b`` (from their environments), once all of them run."""
    ranks = {e["RANK"]: tuple(e.get(k) for k in RANK_ENV) for e in training_processes(cluster, b) if "RANK" in e}
    return ranks if len(ranks) == RANKS else None


def wait_for(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s:\n{log.read_text()[-4000:]}")


JOB_LINE = re.compile(r"^(?:local)?rule (\w+):|^\s+wildcards: (.*)$", re.M)
#: the Snakefile's `localrules`: jobs of seconds, run by Snakemake itself instead of queued on the cluster
LOCAL = {"tracking_store", "tracking_parent", "assemble", "tables", "provenance"}


def describe(job: dict, work: Path) -> tuple:
    """(rule, wildcards) of a SLURM job, from the output file SLURM wrote for it."""
    text = (work / job["StdOut"]).read_text()  # scontrol gives an absolute path
    rule, wildcards = None, ""
    for m in JOB_LINE.finditer(text):
        rule = rule or m.group(1)
        wildcards = wildcards or (m.group(2) or "")
    return rule, wildcards.strip()


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """Run 1 (block 3 fails on purpose, block 2 is scancelled mid-training) and run 2 (the rerun)."""
    work = tmp_path_factory.mktemp("slurm-pipeline")
    (work / "micro.yaml").write_text(MICRO)
    # The deliberate failure: block 3 finds a corrupt resume state and refuses to train from it.
    (work / state(3)).parent.mkdir(parents=True)
    (work / state(3)).write_bytes(b"not a training state")

    proc, log1 = start_snakemake(cluster, work, "run1")
    try:
        # block 2 has written its first training-state checkpoint: kill its SLURM job now
        wait_for(lambda: (work / state(2)).exists(), RUN_TIMEOUT, "block 2 wrote no training state", log1)
        killed = wait_for(lambda: _try(training_job_of, cluster, 2), 30, "no process trains block 2", log1)
        ranks = wait_for(lambda: ranks_of(cluster, 2), 30, f"block 2 is not trained by {RANKS} ranks", log1)
        cluster.client("scancel", killed)
        rc1 = finish(proc, log1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    jobs1 = cluster.jobs()
    before_rerun = {b: (work / block(b)).stat().st_mtime_ns for b in (1, 2)}  # both must have finished

    # The user reads block 3's log, removes the corrupt state and reruns the same command.
    (work / state(3)).unlink()
    proc, log2 = start_snakemake(cluster, work, "run2")
    rc2 = finish(proc, log2)
    seen = {j["JobId"] for j in jobs1}
    jobs2 = [j for j in cluster.jobs() if j["JobId"] not in seen]
    return dict(
        work=work,
        killed=killed,
        ranks=ranks,
        rc1=rc1,
        rc2=rc2,
        log1=log1,
        log2=log2,
        before_rerun=before_rerun,
        run1=[(describe(j, work), j) for j in jobs1],
        run2=[(describe(j, work), j) for j in jobs2],
        local1=local_jobs(log1),
        local2=local_jobs(log2),
        chash=Pipeline.load(work / "micro.yaml").hash(EXP),
    )


LOCAL_JOB = re.compile(r"^localrule (\w+):\n((?:    .*\n)*)", re.M)


def local_jobs(log: Path) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job that a Snakemake run's output shows it ran and finished itself."""
    text = log.read_text()
    finished = set(re.findall(r"^Finished jobid: (\d+) ", text, re.M))
    jobs = []
    for m in LOCAL_JOB.finditer(text):
        fields = dict(re.findall(r"^    (\w+): (.*)$", m.group(2), re.M))
        if fields.get("jobid") in finished:
            jobs.append((m.group(1), fields.get("wildcards", "")))
    return jobs


def _try(fn, *args):
    try:
        return fn(*args)
    except LookupError:
        return None


def of(run: list, rule: str, wildcards: str = "") -> list[dict]:
    return [j for (r, w), j in run if r == rule and (not wildcards or w == wildcards)]


def test_every_job_went_through_sbatch_and_slurm_ran_it_but_the_light_ones(runs):
    ran = runs["run1"] + runs["run2"]
    assert runs["rc2"] == 0, runs["log2"].read_text()[-4000:]
    assert (runs["work"] / "results/tiny/tables/table1.md").is_file()
    assert {rule for (rule, _), _ in ran} == {"prepare_data", "train_block", "evaluate_classifier"}
    # the jobs of seconds ran in the Snakemake process itself, never queued: each of them, once
    here = [job for job in runs["local1"] + runs["local2"] if job[0] != "all"]
    assert sorted(here) == sorted(
        [
            ("tracking_store", ""),
            ("tracking_parent", f"exp={EXP}, chash={runs['chash']}"),
            ("assemble", f"exp={EXP}, assembled=blockwise"),
            ("tables", ""),
            ("provenance", ""),
        ]
    )
    assert {rule for rule, _ in here} == LOCAL
    for (rule, wildcards), job in ran:
        assert job["Partition"] == PARTITION and job["NodeList"] == "localhost", job
        if not (rule == "train_block" and wildcards.endswith("block=3") or job["JobId"] == runs["killed"]):
            assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (rule, wildcards, job)


def test_gpu_requests_training_jobs_are_one_task_and_their_time_limit_grows_with_each_attempt(runs):
    """A training job asks for its experiment's GPUs in ONE task (torchrun starts the ranks inside it: a
    job of several tasks would start the whole job once per task); evaluation runs one process on one GPU;
    the small jobs submitted (data preparation) ask for none."""
    wanted = {"train_block": f"gpu:{RANKS}", "evaluate_classifier": "gpu:1"}
    for (rule, _), job in runs["run1"] + runs["run2"]:
        gpus = job.get("TresPerJob", "") + job.get("TresPerNode", "")
        assert ("gpu" in gpus) == (rule in wanted), (rule, job)
        if rule in wanted:
            assert wanted[rule] in gpus and job["NumTasks"] == "1", (rule, job)
    attempts = sorted(of(runs["run1"], "train_block", f"exp={EXP}, block=3"), key=lambda j: int(j["JobId"]))
    assert [j["TimeLimit"] for j in attempts] == [f"00:{10 * a}:00" for a in range(1, len(attempts) + 1)]


def test_a_failing_block_fails_alone_after_its_retries(runs):
    assert runs["rc1"] != 0
    failed = of(runs["run1"], "train_block", f"exp={EXP}, block=3")
    assert len(failed) == 2  # the first attempt and its retry, each a new SLURM job
    for job in failed:
        assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", job
    # the failure is the one made on purpose; the run's output shows the job's log (show-failed-logs)
    assert f"incomplete checkpoint: metadata sidecar missing for {state(3)}" in runs["log1"].read_text()
    # the other blocks finished in that same run; nothing downstream of block 3 was submitted
    for b in (1, 2):
        assert [j["JobState"] for j in of(runs["run1"], "train_block", f"exp={EXP}, block={b}")][-1] == "COMPLETED"
    assert not {rule for rule, _ in runs["local1"]} & {"assemble", "tables", "provenance"}


def test_rerun_runs_only_the_failed_block_and_what_depends_on_it(runs):
    assert sorted((rule, w) for (rule, w), _ in runs["run2"]) == sorted(
        [("train_block", f"exp={EXP}, block=3"), ("evaluate_classifier", f"exp={EXP}, method=blockwise")]
    )
    assert sorted(job for job in runs["local2"] if job[0] != "all") == sorted(
        [("assemble", f"exp={EXP}, assembled=blockwise"), ("tables", ""), ("provenance", "")]
    )
    for b, mtime in runs["before_rerun"].items():
        assert (runs["work"] / block(b)).stat().st_mtime_ns == mtime  # blocks 1 and 2 were not retrained
    assert load_metadata(runs["work"] / block(3))["resumed_from"] == 0


def test_a_scancelled_job_is_resubmitted_and_resumes_from_its_checkpoint(runs):
    attempts = sorted(of(runs["run1"], "train_block", f"exp={EXP}, block=2"), key=lambda j: int(j["JobId"]))
    assert attempts[0]["JobId"] == runs["killed"] and attempts[0]["JobState"] == "CANCELLED"
    assert [j["JobState"] for j in attempts[1:]] == ["COMPLETED"]
    meta = load_metadata(runs["work"] / block(2))
    assert 0 < meta["resumed_from"] < STEPS and meta["resumed_from"] % CHECKPOINT_EVERY == 0
    assert meta["step"] == STEPS
    assert not (runs["work"] / state(2)).exists()  # a finished job drops its resume state


def test_a_two_gpu_training_job_is_one_task_whose_torchrun_starts_two_ranks(runs):
    """Block 2, caught while it trained: both ranks run in the same SLURM job, job step and task (torchrun
    started them, not SLURM), a step of one task holding 2 GPUs, in a world of 2; each finished block job's
    MLflow run records 2 ranks."""
    ranks = runs["ranks"]
    assert sorted(ranks) == [str(r) for r in range(RANKS)]
    assert set(ranks.values()) == {(runs["killed"], "0", "0", "1", str(RANKS), str(RANKS))}, ranks
    job = next(j for (rule, _), j in runs["run1"] if j["JobId"] == runs["killed"])
    assert job["NumTasks"] == "1" and f"gpu:{RANKS}" in job["TresPerJob"], job

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs['work'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("micro-slurm")
    trained = [
        r
        for r in client.search_runs([experiment.experiment_id], max_results=1000)
        if r.data.tags.get("dblocks.job") == "train" and r.info.status == "FINISHED"
    ]
    assert {r.data.tags["dblocks.block"] for r in trained} == {"1", "2", "3"}
    assert {r.data.tags["dblocks.ranks"] for r in trained} == {str(RANKS)}
    # and the job's own log says so (rank 0 prints it; the other rank prints nothing)
    log = (runs["work"] / f"logs/tiny/{EXP}/train-block-1.log").read_text()
    assert log.count(f"data parallel: {RANKS} ranks, global batch 16") == 1, log[-2000:]
