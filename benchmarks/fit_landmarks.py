"""Add the target's intensity landmarks and detail band to an existing flow model folder, without retraining.

How the shipped model's landmarks were made: the `train` level now fits them itself (on the
resampled volumes of its training subjects), but the shipped `ixi-hh-fast` flow was trained before
standardisation existed. This fits them the same way on the same subjects (the model's
``training_data.subjects_train``: TRAIN split only), with the pipeline's own reorientation and
1.2 mm resampling, and rewrites the folder through the model-folder format (new sha256; the card is
regenerated unless --keep-card).

The detail band (``bidsharmony.image.detail``) is fitted the way ``train`` fits it: the level of
each resampled training volume, standardised onto the landmarks and measured at the training
volumes' median acquired voxel size (stored beside the band). ``--detail-only`` keeps the folder's
landmarks and adds the band and voxel size alone.

The class landmarks (the standardisation's class pass) are fitted in the same pass over the same
resampled volumes (``image.standardise.fit_target_scale``); ``--classes-only`` keeps everything else and adds them alone.

    python benchmarks/fit_landmarks.py bidsharmony/data/models/ixi-hh-fast --data ../shared/data/ixi-hh [--detail-only | --classes-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import rewrite_model_folder

from bidsharmony.flow.checkpoint import read_folder
from bidsharmony.image.detail import BAND, VOXEL, at_resolution, detail_level, fit_band, ras_voxel_mm
from bidsharmony.image.detail import model_entry as detail_entry
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.standardise import CLASS_LANDMARKS, LANDMARKS, fit_target_scale, model_entry, standardise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="flow model folder to add the landmarks to")
    p.add_argument("--data", type=Path, required=True, help="the target BIDS dataset the model was trained on")
    p.add_argument("--detail-only", action="store_true", help="keep the folder's landmarks; fit the detail band only")
    p.add_argument("--classes-only", action="store_true", help="keep the folder's landmarks and band; fit the class landmarks only")
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

    def path(sub):
        label = sub if sub.startswith("sub-") else f"sub-{sub}"
        return next((args.data / label).rglob(f"{label}*_T1w.nii.gz"))

    def volumes(with_affine=False):
        for i, sub in enumerate(subjects, 1):
            img, data = load_t1w(path(sub))
            v, affine = resample_isotropic(*canonical(data, img.affine), voxel)
            yield (v, affine, ras_voxel_mm(img.affine)) if with_affine else v
            if i % 20 == 0:
                print(f"{i}/{len(subjects)} volumes, {time.perf_counter() - t0:.0f} s", flush=True)

    zooms = (voxel,) * 3
    if args.detail_only:
        landmarks, classes = tensors[f"extra.{LANDMARKS}"].double().numpy(), None
    else:
        landmarks, classes = fit_target_scale(volumes(), zooms=zooms)
        if args.classes_only:
            landmarks = tensors[f"extra.{LANDMARKS}"].double().numpy()
    if classes is not None:
        print("class landmarks:", np.round(classes, 3).tolist())
        tensors[f"extra.{CLASS_LANDMARKS}"] = torch.as_tensor(classes, dtype=torch.float64)
        cfg["preprocessing"]["standardisation"] = model_entry(len(subjects))
    if args.classes_only:
        rewrite_model_folder(args.model, tensors, cfg, args.keep_card)
        print(f"written {args.model} in {time.perf_counter() - t0:.0f} s")
        return
    print("standard landmarks:", np.round(landmarks, 3).tolist())
    target = np.median([ras_voxel_mm(nib.load(path(sub)).affine) for sub in subjects], axis=0)
    band = fit_band(detail_level(at_resolution(standardise(v, landmarks, zooms=zooms), affine, a, target), zooms)
                    for v, affine, a in volumes(with_affine=True))
    print("detail band (min, mean, max):", np.round(band, 4).tolist(), "at", np.round(target, 3).tolist(), "mm")
    cfg["preprocessing"]["standardisation"] = model_entry(len(subjects), classes=f"extra.{CLASS_LANDMARKS}" in tensors)
    cfg["preprocessing"]["detail"] = detail_entry(len(subjects))
    tensors[f"extra.{LANDMARKS}"] = torch.as_tensor(landmarks, dtype=torch.float64)
    tensors[f"extra.{BAND}"] = torch.as_tensor(band, dtype=torch.float64)
    tensors[f"extra.{VOXEL}"] = torch.as_tensor(target, dtype=torch.float64)
    rewrite_model_folder(args.model, tensors, cfg, args.keep_card)
    print(f"written {args.model} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
