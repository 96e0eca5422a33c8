"""Benchmarks by area: each module exposes ``run(workdir) -> {figure: {value, unit, goal, measured}}``."""
