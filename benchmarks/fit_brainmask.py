"""Add a learned brain mask to an existing model folder, trained on the model's TRAIN subjects and their parcellations.

The mask (``bidsharmony.image.brainmask``) is trained with ``bidsharmony.train.brainmask`` on the
model's ``training_data.subjects_train`` (TRAIN split only; TEST subjects are refused) and the
brain masks of the target dataset's parcellation derivative (labels > 0), then written into the
folder through the model-folder format (new sha256; the card is regenerated unless --keep-card),
with the target's standard landmarks and class landmarks measured in the mask on the same subjects'
1.2 mm grids (``extra.brain_landmarks``, ``extra.brain_class_landmarks``), as harmonization measures
a source's.
Resumable: the training state is kept in ``--state`` every 250 steps, and rerunning the same
command continues from it (``--stop-at`` ends a run early, for a time limit).

    python benchmarks/fit_brainmask.py MODEL_FOLDER --data ../shared/data/ixi-hh --state /tmp/bm-state
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from common import rewrite_model_folder

from bidsharmony.flow.checkpoint import model_landmarks, read_folder
from bidsharmony.image import brainmask as bm
from bidsharmony.train import brainmask as tbm
from bidsharmony.train.denoiser import pairs_record
from bidsharmony.train.resumable import finished, log_progress


def main() -> None:
    defaults = tbm.BrainMaskConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="model folder to add the brain mask to")
    p.add_argument("--data", type=Path, required=True, help="the target BIDS dataset the model was trained on")
    p.add_argument("--labels", default="derivatives/dlmuse", help="the parcellation derivative inside --data")
    p.add_argument("--state", type=Path, required=True, help="folder for the resumable training state")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--subjects", type=int, default=None, help="train on the first N training subjects only (a quick check)")
    p.add_argument("--stop-at", type=int, default=None, help="end this run at that step (resume later)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep-card", action="store_true", help="keep a hand-written MODEL_CARD.md (update it by hand)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    read = read_folder(args.model)
    cfg, tensors = read
    percentiles = model_landmarks(args.model, read)[1]
    subjects = cfg["training_data"]["subjects_train"][: args.subjects]
    splits = json.loads((args.data / "splits.json").read_text())
    test = {s.removeprefix("sub-") for s in splits["test"]}
    if leak := sorted(test & {s.removeprefix("sub-") for s in subjects}):
        raise SystemExit(f"refusing: TEST subjects among the model's training subjects: {leak[:5]}")

    def paths(sub):
        label = sub if sub.startswith("sub-") else f"sub-{sub}"
        t1w = next((args.data / label).rglob(f"{label}*_T1w.nii.gz"))
        return t1w, next((args.data / args.labels / label).rglob(f"{label}*_dseg.nii.gz"))

    t0 = time.perf_counter()
    bcfg = tbm.BrainMaskConfig(steps=args.steps)
    files = [paths(s) for s in subjects]
    data = pairs_record([f for pair in files for f in pair])
    items = []
    if not finished(args.state, tbm.STATE, bcfg, data):
        items = tbm.training_inputs((tbm.on_grid(*pair) for pair in files), bcfg, np.random.default_rng([bcfg.seed, 0]))
        print(f"{len(items)} training inputs ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    net, curve = tbm.fit(items, bcfg, args.state, data=data, stop_at=args.stop_at, progress=log_progress(bcfg.steps, "brain mask"))
    if len(curve) < bcfg.steps:
        print(f"stopped at step {len(curve)} of {bcfg.steps} after {time.perf_counter() - t0:.0f} s; rerun to continue")
        return
    t1 = time.perf_counter()
    landmarks, classes = tbm.target_landmarks(net, [t1w for t1w, _ in files], percentiles)
    print(f"landmarks in the mask: {', '.join(f'{x:.2f}' for x in landmarks)} ({time.perf_counter() - t1:.0f} s)", flush=True)
    cfg["preprocessing"]["standardisation"]["brain_mask"] = tbm.model_entry(bcfg, len(subjects), len(curve))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(bm.PREFIX)} | tbm.to_tensors(net)
    tensors[f"extra.{bm.LANDMARKS}"] = torch.from_numpy(np.asarray(landmarks, np.float64))
    tensors[f"extra.{bm.CLASS_LANDMARKS}"] = torch.from_numpy(np.asarray(classes, np.float64))
    rewrite_model_folder(args.model, tensors, cfg, args.keep_card)
    print(f"written {args.model} in {time.perf_counter() - t0:.0f} s (the last 200 steps' mean loss {np.mean(curve[-200:]):.4g})")


if __name__ == "__main__":
    main()
