"""Benchmarks of astage side by side with torch DCP's stagers, in one process on the same data.

Run ``python -m benchmarks`` (``--quick`` for a smoke run, ``--backend trio`` for another loop);
results go to ``docs/benchmarks.md``, plots to ``docs/img/`` and raw figures to
``benchmarks/results/latest.json``. ``python -m benchmarks.demo`` is the demo (``make demo``),
``python -m benchmarks.lag_cost`` what the lag probe costs, ``python -m benchmarks.replication`` the
two-rank replication page.

The package, bottom up (a module imports only modules listed before it)::

    timing, rss, machine, record   clocks and medians; host memory; the machine; result records
    state_dicts, config            the state dicts measured; a run's sizes and shared dicts
    runner, futures, lag           the run's event loop; awaiting DCP's futures; loop-lag probe
    lag_cost                       what the probe costs, against each backend's own sleep
    contenders                     the stagers under test behind one interface
    scenarios/                     one module per family of measurements, SCENARIOS by name
    report, plots, __main__        the markdown page and JSON; the PNGs; the command line
    gpt, demo                      the demo's GPT workload; the demo itself
"""
