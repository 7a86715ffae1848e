"""Benchmarks of bidsharmony: quality against the classical peers (``python -m benchmarks.quality``), speed,
memory and the probes behind the method's choices. Run from the repository root; they need ``pip install -e .[bench]``
and the shared data beside the repository. Not part of the installed package."""
