"""Benchmarks of astage side by side with torch DCP's stagers, in one process on the same data.

Run ``python -m benchmarks`` (``--quick`` for a smoke run); results go to ``docs/benchmarks.md``,
plots to ``docs/img/`` and raw figures to ``benchmarks/results/latest.json``.
"""
