"""Documentation examples run: README.md's Python blocks and every ``>>>`` docstring example.

The README's ```python blocks run in order in one namespace (as a reader pastes them); every
module of the installed packages is searched for doctest examples, which must pass.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import re

ROOT = pathlib.Path(__file__).parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PACKAGES = ("jaxattn", "models", "train", "pallas_kernels")


def readme_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return _BLOCK.findall(text)


def test_readme_blocks_found():
    # the extractor itself: a block is found, a bash block is not
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert readme_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_readme_python_examples_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2, "README.md should show the op and the model in runnable blocks"
    namespace = {"__name__": "__readme__"}
    for i, source in enumerate(blocks):
        exec(compile(source, f"README.md[python block {i}]", "exec"), namespace)


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if not info.name.split(".")[-1].startswith("test"):
                names.append(info.name)
    return names


def test_docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failed = []
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if runner.run(test).failed:
                failed.append(test.name)
    assert not failed, f"docstring examples failed: {failed}"
    assert runner.summarize(verbose=False).attempted > 0, "no docstring example was found"
