"""``dblocks tables``, ``verify`` and ``dvc-yaml``: what a params file produced, turned into the paper's
tables, checked against its records, and described for DVC."""

from __future__ import annotations

from pathlib import Path

from dblocks.cli.common import Command
from dblocks.errors import IntegrityFailure, UsageError
from dblocks.io import write_text_atomic

# Every command module is imported to build the parser, so each imports the modules its commands use
# inside the command functions: the tables import MLflow and matplotlib, the pipeline Snakemake.


def cmd_tables(args) -> None:
    from dblocks.tables import generate

    if not Path(args.params).is_file():
        raise UsageError(f"--params {args.params}: file not found")
    written = generate(args.params, args.out, args.tracking_uri)
    print(f"wrote {len(written)} files under {args.out}")


def cmd_verify(args) -> None:
    """Hash every artefact of a params file against its JSON record; with --quarantine set the corrupt
    ones aside so that the next workflow run rebuilds exactly them and what depends on them."""
    from dblocks.integrity import CORRUPT, MISSING, OK, Finding, check, quarantine
    from dblocks.pipeline import Pipeline

    pipe = Pipeline.load(args.params)
    artefacts = pipe.artefacts()
    counts = {OK: 0, MISSING: 0, CORRUPT: 0}
    remaining = 0
    for artefact in artefacts:
        finding = check(artefact)
        group = pipe.group_of(artefact)
        if finding.status == MISSING and group is not None and Path(group).is_dir():
            finding = Finding(finding.path, CORRUPT, f"missing from {group}, which its job wrote whole")
        counts[finding.status] += 1
        if finding.status == MISSING and args.verbose:
            print(f"missing  {artefact} (not built yet, or deleted: the next run builds it)")
        if finding.status == OK and args.verbose:
            print(f"ok       {artefact}")
        if finding.status != CORRUPT:
            continue
        print(f"CORRUPT  {artefact}: {finding.detail}")
        if args.quarantine:
            for moved in quarantine(finding, Path(group) if group else None):
                print(f"         set aside as {moved}")
        else:
            remaining += 1
    print(
        f"{counts[OK]} intact, {counts[CORRUPT]} corrupt, {counts[MISSING]} missing "
        f"({len(artefacts)} artefacts of {args.params})"
    )
    if counts[CORRUPT] and args.quarantine:
        print("the next 'snakemake' run rebuilds what was set aside, and everything that depends on it")
    if remaining:
        raise IntegrityFailure(
            f"{remaining} corrupt artefact(s); rerun with --quarantine to set them aside "
            f"so that 'snakemake' rebuilds them"
        )


def cmd_dvc_yaml(args) -> None:
    from dblocks.dvcgen import generate

    if not Path(args.params).is_file():
        raise UsageError(f"--params {args.params}: file not found")
    text = generate(args.params)
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise UsageError(
                f"{out} is out of date with the Snakemake DAG; run: dblocks dvc-yaml --params {args.params} --out {out}"
            )
        print(f"{out} is up to date")
        return
    write_text_atomic(out, text)
    print(f"wrote {out}")


def register(command: Command) -> None:
    """Add tables, verify and dvc-yaml to the ``dblocks`` parser, in the order its help lists them."""
    p = command("tables", cmd_tables, "regenerate the paper's tables and figures from MLflow")
    p.add_argument("--params", required=True, help="params file (experiments and which tables they feed)")
    p.add_argument("--out", required=True, help="output directory (tables/ and figures/ are written in it)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the params file's; env overrides)")

    p = command(
        "verify",
        cmd_verify,
        "check every artefact of a params file (data, checkpoints, models) against the sha256 in its "
        "JSON record; exit 1 if one is corrupt",
    )
    p.add_argument("--params", default="params/tiny.yaml")
    p.add_argument(
        "--quarantine",
        action="store_true",
        help="set corrupt artefacts aside as <name>.corrupt so that the next snakemake run rebuilds "
        "exactly them and what depends on them (nothing is deleted)",
    )
    p.add_argument("--verbose", action="store_true", help="list intact and not-yet-built artefacts too")

    p = command("dvc-yaml", cmd_dvc_yaml, "write dvc.yaml from the Snakemake DAG (or --check it is current)")
    p.add_argument("--params", default="params/tiny.yaml")
    p.add_argument("--out", default="dvc.yaml")
    p.add_argument("--check", action="store_true", help="exit 2 if the file differs from the DAG")
