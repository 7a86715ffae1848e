"""Add a learned denoiser to an existing model folder, trained as the `train` level trains it, without retraining the flow.

How the shipped model's denoiser was made: the `train` level now fits one itself (on its training
subjects' T1w), but the shipped `ixi-hh-fast` flow was trained before it existed. This trains it the
same way (``bidsharmony.train.denoiser.train_on_files``) on the same subjects (the model's
``training_data.subjects_train``: TRAIN split only), onto the folder's landmarks, and rewrites the
folder through the model-folder format (new sha256; the card is regenerated unless --keep-card).
Resumable: the training state is kept in ``--state`` every 250 steps, and rerunning the same command
continues from it (``--stop-at`` ends a run early, for a time limit).

    python benchmarks/fit_denoiser.py bidsharmony/data/models/ixi-hh-fast --data ../shared/data/ixi-hh --state /tmp/dn-state
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from common import rewrite_model_folder

from bidsharmony.flow.checkpoint import model_landmarks, read_folder
from bidsharmony.image.denoiser import PREFIX
from bidsharmony.train import denoiser as tdn


def main() -> None:
    defaults = tdn.DenoiserConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="model folder with landmarks to add the denoiser to")
    p.add_argument("--data", type=Path, required=True, help="the target BIDS dataset the model was trained on")
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
    subjects = cfg["training_data"]["subjects_train"][: args.subjects]
    splits = json.loads((args.data / "splits.json").read_text())
    test = {s.removeprefix("sub-") for s in splits["test"]}
    if leak := sorted(test & {s.removeprefix("sub-") for s in subjects}):
        raise SystemExit(f"refusing: TEST subjects among the model's training subjects: {leak[:5]}")
    landmarks, _ = model_landmarks(args.model, read)

    def path(sub):
        label = sub if sub.startswith("sub-") else f"sub-{sub}"
        return next((args.data / label).rglob(f"{label}*_T1w.nii.gz"))

    t0 = time.perf_counter()
    dcfg = tdn.DenoiserConfig(steps=args.steps)
    net, curve = tdn.train_on_files([path(s) for s in subjects], landmarks, dcfg, args.state, stop_at=args.stop_at,
                                    progress=tdn.log_progress(dcfg.steps))
    if len(curve) < dcfg.steps:
        print(f"stopped at step {len(curve)} of {dcfg.steps} after {time.perf_counter() - t0:.0f} s; rerun to continue")
        return
    cfg["preprocessing"]["detail"]["learned_denoiser"] = tdn.model_entry(dcfg, len(subjects), len(curve))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)} | tdn.to_tensors(net)
    rewrite_model_folder(args.model, tensors, cfg, args.keep_card)
    print(f"written {args.model} in {time.perf_counter() - t0:.0f} s (the last 500 steps' mean loss {sum(curve[-500:]) / len(curve[-500:]):.4g})")


if __name__ == "__main__":
    main()
