"""segens' benchmarks, an importable package: run each script from the repository root as a module, e.g.
``.venv/bin/python -m bench.run_all`` or ``.venv/bin/python -m bench.scale --quick`` (see bench/README.md).
bench.fixture makes the synthetic members every benchmark measures on; bench.common times and reports."""
