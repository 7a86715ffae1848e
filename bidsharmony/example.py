"""A small BIDS dataset built offline from real anatomy shipped with nibabel.

``python -m bidsharmony.example DIR`` writes two participants made from nibabel's example head
(``nibabel/tests/data/anatomical.nii``, a real T1w at 2 mm), each "scanned" on a simulated
scanner (gamma contrast, smooth bias field, Rician noise): sub-01 with two sessions, sub-02 with
two runs (one stored in another orientation). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

import numpy as np

SCANNERS = {
    # name: (gamma, bias ramp ±, noise fraction, scale): ``bidsharmony.simulation.scan``
    "A": (0.8, 0.15, 0.01, 900.0),
    "B": (1.3, 0.25, 0.02, 2500.0),
}


def source_head():
    """(data, affine) of nibabel's example head."""
    import nibabel as nb

    # The file ships inside the nibabel package; nibabel.testing, which also knows where, needs
    # pytest, which a plain installation does not have.
    head = files("nibabel") / "tests" / "data" / "anatomical.nii"
    img = nb.load(str(head))
    return np.asanyarray(img.dataobj, dtype=np.float32), img.affine


def simulate_scanner(data: np.ndarray, gamma: float, bias: float, noise: float, scale: float, rng) -> np.ndarray:
    """The head on one simulated scanner (``bidsharmony.simulation.scan``: monotone contrast change,
    smooth multiplicative bias, Rician noise, arbitrary units), from the head scaled to its 99.5th
    percentile (its brightest voxels are a few vessels at twice the tissue's level)."""
    from bidsharmony.simulation import scan

    u = np.clip(data / np.percentile(data, 99.5), 0, 1.2)
    return scan(u, rng, gamma=gamma, bias=bias, noise=noise, scale=scale)


def build_example(root, seed: int = 0) -> Path:
    import nibabel as nb

    root = Path(root)
    rng = np.random.default_rng(seed)
    data, affine = source_head()
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "bidsharmony example (nibabel anatomical.nii with simulated scanners)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "PDDL (derived from nibabel test data, MIT licence)",
    }, indent=2) + "\n")  # fmt: skip
    (root / "participants.tsv").write_text("participant_id\tscanner\nsub-01\tA\nsub-02\tB\n")
    (root / "participants.json").write_text(json.dumps({
        "scanner": {"Description": "the simulated scanner of the participant's images (bidsharmony.example.SCANNERS)"},
    }, indent=2) + "\n")  # fmt: skip
    (root / "README").write_text(
        "bidsharmony example dataset\n\n"
        "Two participants made from nibabel's example head (nibabel/tests/data/anatomical.nii, a real T1w at 2 mm),\n"
        "each 'scanned' on a simulated scanner (gamma contrast, smooth bias field, Rician noise): sub-01 with two\n"
        "sessions, sub-02 with two runs (the second stored in LPS voxel order). Built by `python -m bidsharmony.example`.\n"
    )
    files = {
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz": "A",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz": "A",
        "sub-02/anat/sub-02_run-1_T1w.nii.gz": "B",
        "sub-02/anat/sub-02_run-2_T1w.nii.gz": "B",
    }
    for i, (rel, scanner) in enumerate(files.items()):
        vol = simulate_scanner(data, *SCANNERS[scanner], rng=rng)
        img = nb.Nifti1Image(vol, affine)
        if i == 3:  # the same head stored another way round (LPS voxel order)
            img = img.as_reoriented([[0, 1], [1, -1], [2, 1]])
        img.header.set_xyzt_units("mm")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.to_filename(str(path))
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps({
            "Manufacturer": f"Simulated-{scanner}", "MagneticFieldStrength": 3 if scanner == "A" else 1.5,
        }, indent=2) + "\n")  # fmt: skip
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bidsharmony.example", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to create the dataset in")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_example(args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
