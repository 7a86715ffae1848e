"""The quality benchmark: simulated source scanners with known truth, the real CLI, classical peers.

    python -m benchmarks.quality --quick          # minutes on 2 CPU cores
    python -m benchmarks.quality --subjects 35    # the full run (a GPU helps)

``scanners`` makes the sources, ``peers`` the classical normalisations, ``scores`` the metrics,
``run`` drives the CLI and writes the tables, ``figures`` the plots.
"""
