"""``python -m bidsharmony.demo DIR``: the whole job on the embedded example, offline.

1. builds the example BIDS dataset (``bidsharmony.example``) in DIR/bids;
2. uses the bundled default model, or, where this installation has none, fits a ``tiny`` one on
   the example with the real ``train`` level (DIR/model) — a smoke model, not a useful prior;
3. runs ``bidsharmony DIR/bids DIR/out participant`` and the group level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from bidsharmony.cli.run import main as cli
    from bidsharmony.example import build_example
    from bidsharmony.models import bundled_models, DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m bidsharmony.demo", description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="folder for the example dataset, model and outputs")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    root = args.dir.absolute()
    bids = root / "bids"
    if not (bids / "dataset_description.json").is_file():
        build_example(bids)
    common = ["-w", str(root / "work"), "--device", args.device]
    model = bundled_models().get(DEFAULT_MODEL)
    if model is None and (root / "model" / "config.json").is_file():
        model = root / "model"  # trained by an earlier demo run (train refuses a folder holding a model)
    if model is None:
        model = root / "model"
        print(f"no bundled model: training a tiny smoke-test model in {model}", file=sys.stderr)
        code = cli([str(bids), str(model), "train", "--preset", "tiny", "--steps", "60", "--train-batch-size", "16",
                    "--val-every", "30", "--checkpoint-every", "30", *common])  # fmt: skip
        if code:
            return code
    out = root / "out"
    code = cli([str(bids), str(out), "participant", "--model", str(model), *common])
    if code:
        return code
    code = cli([str(bids), str(out), "group"])
    if code == 0:
        print(f"harmonized images: {out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
