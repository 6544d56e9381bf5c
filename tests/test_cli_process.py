"""The ``dblocks`` command as a process of its own: when a command has finished, the process skips the
interpreter's last garbage collections (~0.4 s of every job); a call of ``dblocks.cli.main`` from Python
(the tests) leaves its process as it was."""

from __future__ import annotations

import gc
import subprocess
import sys

from dblocks.cli import main


def test_the_command_process_skips_the_last_collections_but_a_call_from_python_does_not(capsys):
    frozen = gc.get_freeze_count()
    assert main(["--help"]) == 0 and "track-init" in capsys.readouterr().out
    assert gc.get_freeze_count() == frozen
    code = (
        "import gc, sys; from dblocks.cli import main; sys.argv = ['dblocks', '--help']; rc = main(); "
        "print(rc, gc.get_freeze_count() > 0, file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.strip().splitlines()[-1] == "0 True" and "track-init" in proc.stdout


def test_a_process_that_loaded_triton_collects_as_usual():
    """triton's nanobind extensions print "leaked instance" pages when their objects are left to the exit."""
    code = (
        "import gc, sys, types; sys.modules['triton'] = types.ModuleType('triton'); from dblocks.cli import main; "
        "sys.argv = ['dblocks', '--help']; rc = main(); print(rc, gc.get_freeze_count() > 0, file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.strip().splitlines()[-1] == "0 False"
