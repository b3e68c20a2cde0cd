"""Every flag of every script explains itself in --help (internal ones say so with argparse.SUPPRESS)."""

import ast

import pytest

from tests.train_utils import REPO

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
