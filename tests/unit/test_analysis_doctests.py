"""The docstring examples of proxy.analysis are tests too."""

import doctest
import importlib

import pytest

MODULES = ["lexer", "parse", "schema", "functions", "resolve", "flows", "utility", "access", "fingerprint", "positions",
           "shape"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"proxy.analysis.{name}")
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0, f"proxy.analysis.{name} has no docstring examples"
    assert failed == 0
