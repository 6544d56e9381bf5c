"""``dblocks track-init``, ``track-sync`` and ``ui``: the MLflow store the jobs log to, set up before
they fan out, filled later from their journals, and browsed."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from dblocks.cli.common import Command
from dblocks.errors import UsageError
from dblocks.inputs import existing_dir

# Every command module is imported to build the parser, so each imports the modules its commands use
# inside the command functions: a tracking job needs no torch, and a journal-mode one no MLflow (seconds of start-up
# per job; tests/test_tracking.py checks both).


def cmd_track_init(args) -> None:
    from dblocks.params import Params
    from dblocks.tracking import init_runs, runs_view_url

    Params.load(args.params)  # one-line ConfigError (exit 2) before MLflow is imported
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise UsageError(f"--out-dir {args.out_dir}: exists and is not a directory")
    experiment_id = None
    for path in init_runs(
        args.params, args.out_dir, args.tracking_uri, args.experiment, args.store_only, args.allow_offline
    ):
        record = json.loads(path.read_text())
        what = f"parent run {record['parent_run_id']}" if "parent_run_id" in record else "experiment"
        if record.get("offline"):
            what = "no run yet (store unreachable)"
        elif record.get("mode") == "journal":
            what = "no run yet (journal mode: 'dblocks track-sync' logs the jobs' journals)"
        print(f"wrote {path}: {what} in {record['mlflow_experiment']!r} at {record['tracking_uri']}")
        experiment_id = record.get("experiment_id") or experiment_id
    if experiment_id is not None:
        print(f"browse the runs: 'dblocks ui --params {args.params}', then open {runs_view_url(experiment_id)}")


def cmd_track_sync(args) -> None:
    from dblocks.tracking import sync_journals

    existing_dir(args.runs_dir, "--runs-dir")
    report = sync_journals(args.runs_dir, args.tracking_uri)
    print(
        f"{len(report.logged)} runs logged now ({len(report.replaced)} of them replace runs cut short), "
        f"{len(report.present)} already tracked, {len(report.unfinished)} jobs did not finish (not logged)"
    )
    for path in report.missing_artifacts:
        print(f"warning: artifact {path} no longer exists; its run was logged without it", file=sys.stderr)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_ui(args) -> None:
    """The MLflow UI on the pipeline's store, bound to loopback unless --host says otherwise."""
    from dblocks.params import Params
    from dblocks.tracking import resolve_uri, sqlite_path

    # the params file gives the store (unless --tracking-uri does) and the experiment whose runs to link
    wanted = args.params is not None and (args.tracking_uri is None or Path(args.params).is_file())
    params = Params.load(args.params) if wanted else None
    configured = args.tracking_uri
    if configured is None and params is not None:
        configured = params.tracking_uri
    uri = resolve_uri(configured)
    if not uri.startswith("sqlite:///"):
        raise UsageError(
            f"tracking URI {uri}: is not a SQLite store; allowed: sqlite:///PATH (a server URI "
            f"already has its own UI: open it in a browser)"
        )
    db = sqlite_path(uri)
    if db is None or not db.is_file():
        raise UsageError(f"tracking URI {uri}: no such database yet; run the pipeline or 'dblocks track-init' first")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: allowed: 1..65535")
    if args.host not in LOOPBACK:
        print(f"dblocks ui: warning: --host {args.host} exposes the runs beyond this machine", file=sys.stderr)
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow is None:
        raise UsageError("the 'mlflow' command is not installed next to this Python")
    argv = [
        mlflow,
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {base} (Ctrl-C stops it)", flush=True)
    if params is not None:  # MLflow 3 opens an experiment on its GenAI overview: link the runs table instead
        from mlflow import MlflowClient

        from dblocks.tracking import runs_view_url

        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(params.mlflow_experiment)
        if experiment is not None:
            print(
                f"the runs of {params.mlflow_experiment!r}: {runs_view_url(experiment.experiment_id, base)}", flush=True
            )
    os.execv(mlflow, argv)  # the server replaces this process: signals reach it directly


def register(command: Command) -> None:
    """Add track-init, track-sync and ui to the ``dblocks`` parser, in the order its help lists them."""
    p = command(
        "track-init",
        cmd_track_init,
        "create the MLflow experiment and one parent run per experiment of a params file, once, "
        "before the jobs fan out (tracking.mode: journal: only write the jobs' run records, without "
        "touching the store; 'dblocks track-sync' creates both later)",
    )
    p.add_argument("--params", required=True, help="params file (scale, tracking: {uri, experiment}, experiments)")
    p.add_argument(
        "--out-dir", required=True, help="directory for <experiment>.<config hash>.json (the jobs' --track files)"
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: tracking.uri of the params file; MLFLOW_TRACKING_URI overrides both)",
    )
    p.add_argument("--experiment", action="append", help="only this experiment's parent run (repeatable)")
    p.add_argument(
        "--store-only", action="store_true", help="only create the store and MLflow experiment (writes store.json)"
    )
    p.add_argument(
        "--allow-offline",
        action="store_true",
        help="if the store is unreachable, warn and write records without runs: the jobs then run "
        "untracked and 'dblocks track-sync' logs them later",
    )

    p = command(
        "track-sync",
        cmd_track_sync,
        "log the runs that jobs journaled (in journal mode, or while the tracking store was unreachable), "
        "with the parent runs they lack (idempotent: a run already in the store is never logged twice)",
    )
    p.add_argument("--runs-dir", required=True, help="the directory of track-init's records (holds journal/)")
    p.add_argument(
        "--tracking-uri",
        help="log into this store instead of the one each job was meant for (MLFLOW_TRACKING_URI overrides)",
    )

    p = command("ui", cmd_ui, "serve the MLflow UI on the pipeline's SQLite store, on 127.0.0.1 by default")
    p.add_argument("--params", default="params/tiny.yaml", help="params file whose tracking.uri to show")
    p.add_argument("--tracking-uri", help="a sqlite:/// store (default: the params file's; MLFLOW_TRACKING_URI wins)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server worker processes (one is plenty for a local UI)")
