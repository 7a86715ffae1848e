"""The group level: one TSV row per harmonized run, read from the sidecars in OUT_DIR."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from bidsharmony.errors import NoFilesError
from bidsharmony.outputs import atomic_write_text

COLUMNS = ("file", "model", "model_sha256", "device", "slices_harmonized", "fallback_slices", "seconds")


def write_group_summary(out_dir) -> Path:
    out_dir = Path(out_dir)
    rows = []
    for sidecar in sorted(out_dir.glob("sub-*/**/anat/*_desc-harmonized_T1w.json")):
        meta = json.loads(sidecar.read_text())
        rows.append({
            "file": sidecar.relative_to(out_dir).as_posix().replace(".json", ".nii.gz"),
            "model": meta.get("Model", {}).get("Name"),
            "model_sha256": meta.get("Model", {}).get("Sha256"),
            "device": meta.get("Device"),
            "slices_harmonized": meta.get("SlicesHarmonized"),
            "fallback_slices": meta.get("FallbackSlices"),
            "seconds": meta.get("HarmonizationSeconds"),
        })  # fmt: skip
    if not rows:
        raise NoFilesError(f"{out_dir}: no harmonized outputs found; run the participant level first")
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = out_dir / "group.tsv"
    atomic_write_text(path, buf.getvalue())
    return path
