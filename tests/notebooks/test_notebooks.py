"""Notebooks run: every code cell of each notebook executes in one namespace, in order, and
prints what a reader can read (a summary, not a dump of arrays)."""

import contextlib
import io
import json
import pathlib

import pytest

MAX_CELL_LINES = 60  # a cell that prints more is dumping state, not showing a result

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cells = json.loads(path.read_text())["cells"]
    namespace = {"__name__": "__notebook__"}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        # shell/magic lines (%pip, !git) are Colab set-up, not code
        source = "\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!")))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
        lines = printed.getvalue().count("\n")
        assert lines <= MAX_CELL_LINES, f"{path.name} cell {i} printed {lines} lines"


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ should hold at least the quickstart"
