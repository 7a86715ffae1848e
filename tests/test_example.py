"""The embedded example builds in a plain installation (no test extras)."""

import subprocess
import sys


def test_example_builds_without_pytest(tmp_path):
    # A plain `pip install .` has no pytest; block it to stand for that installation.
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from bidsharmony.example import build_example\n"
        f"build_example({str(tmp_path / 'bids')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "bids").rglob("*_T1w.nii.gz"))) == 4
