"""histodiff's benchmarks and experiments, kept out of the installed package.

Run from the repository root (``make bench``, ``python jobs/benchmark.py``, ``histodiff bench``):
the local Ray workers import ``bench`` from the driver's current directory.

- ``runner``: runs the areas and merges their figures into ``bench/results.json``.
- ``areas/<area>.py``: one module per area, each with ``run(workdir) -> {figure: {...}}``.
- ``common``: measurement helpers the areas share; ``gpu_figures``: the ``gpu`` area's figures.
- ``toys``: toy models and data shared by the areas and the tests.
- ``validation``: the MNIST method-validation protocol (the ``validate`` area).
"""
