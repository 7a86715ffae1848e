"""Add the target's typical bias field to an existing model folder, fitted as the `train` level fits it, without retraining the flow.

The `train` level now fits the typical field itself (``--field-volumes``), but the shipped `ixi-hh-fast`
model was trained before it existed. This fits it the same way (``bidsharmony.image.field.fit_typical``)
on up to ``--volumes`` of the model's training subjects (``training_data.subjects_train``: TRAIN split
only; the validation subjects stay unseen, for ``field_probe.py``), each standardised with the
folder's landmarks, and rewrites the folder through the model-folder format (new sha256; the card is
regenerated unless --keep-card).

    python benchmarks/fit_field.py bidsharmony/data/models/ixi-hh-fast --data ../shared/data/ixi-hh [--grids FILE.npz]

``--grids`` keeps each subject's N4 grid (the expensive part: ~16 s a volume), so that the fit
(``--components``) can be redone from them in a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import common
import numpy as np
import torch

from bidsharmony.flow.checkpoint import model_landmarks, read_folder
from bidsharmony.image.field import BASIS, COMPONENTS, EXTRAS, fit_from_grids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="model folder with landmarks to add the typical field to")
    p.add_argument("--data", type=Path, required=True, help="the target BIDS dataset the model was trained on")
    p.add_argument("--volumes", type=int, default=30, help="training subjects to fit on (a seeded choice, as the train level makes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", type=int, default=COMPONENTS, help="principal components of the heads' own fields kept")
    p.add_argument("--grids", type=Path, default=None, help="read (if it holds these subjects) or write the subjects' N4 grids here")
    p.add_argument("--keep-card", action="store_true", help="keep a hand-written MODEL_CARD.md (update it by hand)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    read = read_folder(args.model)
    cfg, tensors = read
    landmarks, _ = model_landmarks(args.model, read)
    subjects = sorted(cfg["training_data"]["subjects_train"])
    if len(subjects) > args.volumes:
        subjects = [subjects[i] for i in sorted(np.random.default_rng(args.seed).choice(len(subjects), args.volumes, replace=False))]
    t0 = time.perf_counter()
    grids = common.field_grids(args.data, subjects, landmarks, args.grids)
    typical = fit_from_grids(grids, args.components)
    cfg["preprocessing"]["field"] = {**typical.model_entry(), "subjects": subjects}
    tensors = {k: v for k, v in tensors.items() if k.removeprefix("extra.") not in (*EXTRAS, BASIS)}
    tensors.update({f"extra.{k}": torch.as_tensor(v) for k, v in typical.to_extras().items()})
    common.rewrite_model_folder(args.model, tensors, cfg, args.keep_card)
    print(f"written {args.model} in {time.perf_counter() - t0:.0f} s (N4 variance {typical.n4_var:.5f}; subjects {json.dumps(subjects)})")


if __name__ == "__main__":
    main()
