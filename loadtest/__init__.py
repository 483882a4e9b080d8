"""Benchmarks and load tools; never collected by pytest (see pyproject's testpaths)."""
