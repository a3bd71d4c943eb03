"""Experiment configs: Python files, each with its exact command line in its docstring."""
