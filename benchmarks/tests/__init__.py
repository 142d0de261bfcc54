"""Tests of the benchmark harness (scenarios, checks, report), and what they share."""

MACHINE = {
    "date": "today",
    "command": "python -m benchmarks",
    "cpu": "cpu",
    "cores": 2,
    "ram_gib": 1.0,
    "gpu": None,
    "python": "3.11",
    "torch": "2",
    "platform": "linux",
    "git": "abc",
    "loop": "asyncio",
}
"""A machine description for rendering reports in tests."""
