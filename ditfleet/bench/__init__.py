"""Benchmark suites behind ``ditfleet bench``.

Each suite is a module with ``add_arguments(parser)`` and ``main(args) -> int``; results are
written as JSON (plus a PNG where matplotlib is installed) under ``benchmarks/results/``, each
naming its card, GPU count and commit (see :mod:`ditfleet.bench.common`).
"""
