"""The public surface: every name a package's ``__all__`` lists is an attribute after import."""

import importlib

import pytest


@pytest.mark.parametrize("package", ["jaxattn", "jaxattn.ops", "jaxattn.layers", "jaxattn.cache"])
def test_all_names_exist(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ lists names it does not define: {missing}"


def test_generate_reachable_from_top_level():
    import jaxattn

    assert callable(jaxattn.generate.generate)
