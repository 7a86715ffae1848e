"""Add the target's intensity landmarks to an existing flow model folder, without retraining.

How the shipped model's landmarks were made: the `train` level now fits them itself (on the
resampled volumes of its training subjects), but the shipped `ixi-hh-fast` flow was trained before
standardisation existed. This fits them the same way on the same subjects (the model's
``training_data.subjects_train``: TRAIN split only), with the pipeline's own reorientation and
1.2 mm resampling, and rewrites the folder through the model-folder format (new sha256; the card is
regenerated unless --keep-card).

    python bench/fit_landmarks.py bidsharmony/data/models/ixi-hh-fast --data ../shared/data/ixi-hh
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bidsharmony.flow.checkpoint import read_folder
from bidsharmony.modelfolder import CARD, DESCRIBED, write_folder
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.standardise import LANDMARKS, fit_landmarks, model_entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="flow model folder to add the landmarks to")
    p.add_argument("--data", type=Path, required=True, help="the target BIDS dataset the model was trained on")
    p.add_argument("--keep-card", action="store_true", help="keep a hand-written MODEL_CARD.md (update it by hand)")
    args = p.parse_args()
    cfg, tensors = read_folder(args.model)
    subjects = cfg["training_data"]["subjects_train"]
    splits = json.loads((args.data / "splits.json").read_text())
    test = {s.removeprefix("sub-") for s in splits["test"]}
    if leak := sorted(test & {s.removeprefix("sub-") for s in subjects}):
        raise SystemExit(f"refusing: TEST subjects among the model's training subjects: {leak[:5]}")
    voxel = float(cfg["preprocessing"]["voxel_size"])
    t0 = time.perf_counter()

    def volumes():
        for i, sub in enumerate(subjects, 1):
            label = sub if sub.startswith("sub-") else f"sub-{sub}"
            img, data = load_t1w(next((args.data / label).rglob(f"{label}*_T1w.nii.gz")))
            yield resample_isotropic(*canonical(data, img.affine), voxel)[0]
            if i % 20 == 0:
                print(f"{i}/{len(subjects)} volumes, {time.perf_counter() - t0:.0f} s", flush=True)

    landmarks = fit_landmarks(volumes(), zooms=(voxel,) * 3)
    print("standard landmarks:", np.round(landmarks, 3).tolist())
    # The flow's samples and training curve still describe the same flow: they stay (and the card, if asked).
    kept = {name: (args.model / name).read_bytes() for name in DESCRIBED if (args.model / name).is_file()
            and (name != CARD or args.keep_card)}
    cfg = {k: v for k, v in cfg.items() if k != "weights_sha256"}
    cfg["preprocessing"]["standardisation"] = model_entry(len(subjects))
    tensors[f"extra.{LANDMARKS}"] = torch.as_tensor(landmarks, dtype=torch.float64)
    write_folder(args.model, tensors, cfg)
    for name, data in kept.items():
        (args.model / name).write_bytes(data)
    print(f"written {args.model} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
