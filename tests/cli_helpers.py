"""Running `ouro-lab` from tests: in-process through main() (exit codes, one-line errors)
or as a subprocess (import-time behaviour, a clean interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(monkeypatch, capsys, *args):
    """`ouro-lab ARGS` in-process, through main() (exit codes and one-line errors)."""
    from ouro_lab.cli import main

    monkeypatch.setattr(sys, "argv", ["ouro-lab", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, e.value.code or 0, out.out, out.err)


def cli(*args, cwd=None):
    """`python -m ouro_lab.cli ARGS` in a subprocess (wide terminal for tables)."""
    return subprocess.run([sys.executable, "-m", "ouro_lab.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"})
