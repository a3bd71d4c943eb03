"""The public surface: every name a package's ``__all__`` lists is an attribute after import."""

import importlib

import pytest


@pytest.mark.parametrize(
    "package",
    [
        "jaxattn",
        "jaxattn.ops",
        "jaxattn.layers",
        "jaxattn.cache",
        "jaxattn.convert",
        "jaxattn.heads",
        "jaxattn.lowrank",
        "jaxattn.optim",
    ],
)
def test_all_names_exist(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ lists names it does not define: {missing}"


def test_generate_reachable_from_top_level():
    import jaxattn

    assert callable(jaxattn.generate.generate)


def test_jaxattn_imports_no_model_or_training_code():
    """DESIGN.md's layering: models and train build on jaxattn, never the reverse. Checked on
    every import statement under jaxattn/ (including ones inside functions), not docstrings."""
    import ast
    import pathlib

    root = pathlib.Path(importlib.import_module("jaxattn").__file__).parent
    bad = []
    for file in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("models", "train", "benchmarks"):
                    bad.append(f"{file.relative_to(root.parent)}:{node.lineno}: {name}")
    assert not bad, "jaxattn imports code that builds on it:\n" + "\n".join(bad)
