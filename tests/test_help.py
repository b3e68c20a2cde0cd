"""Every flag of every script explains itself in --help (internal ones say so with argparse.SUPPRESS)."""

import ast
import subprocess
import sys

import pytest

from tests.train_utils import REPO, subprocess_env

SOURCES = sorted(p for folder in ("scripts", "trainer", "dataset", "model") for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_add_argument_has_help(path):
    flags_without_help = [
        f"line {call.lineno}: {[a.value for a in call.args if isinstance(a, ast.Constant)]}"
        for call in ast.walk(ast.parse(path.read_text()))
        if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "add_argument"
        and not any(k.arg == "help" for k in call.keywords)
    ]
    assert not flags_without_help, f"{path.relative_to(REPO)}: flags with no help: {flags_without_help}"


def test_a_script_that_ends_through_the_interpreter_prints_no_leak_report(tmp_path):
    """Imports are frozen away from the collector (trainer/frozen_imports.py); with triton installed (a CUDA torch),
    its nanobind bindings listed every frozen object as leaked at exit, ~30 lines after each --help."""
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "chat.py"), "--help"], capture_output=True, text=True,
                         timeout=300, env=subprocess_env())
    assert run.returncode == 0 and "leaked" not in run.stderr, run.stderr[-2000:]
