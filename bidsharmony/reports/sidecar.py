"""Reading a run's sidecar back: the one reader that the participant reports and the group level share."""

from __future__ import annotations

import json
from pathlib import Path

# The sidecar fields the group level summarises per scanner (group.tsv columns).
SUMMARY_METRICS = ("similarity_to_input", "histogram_distance_before", "histogram_distance_after", "slice_step_ratio", "seconds")
_SIDECAR_OBJECTS = ("Model", "Quality", "SourceScanner", "Parameters")
_SIDECAR_NUMBERS = ("SlicesHarmonized", "SlicesTotal", "FallbackSlices", "HarmonizationSeconds")


def read_sidecar(path: Path) -> dict:
    """A run's ``*_desc-harmonized_T1w.json``, checked for what the reports read; ValueError(cause)
    when it is not. bidsharmony writes sidecars atomically, so a broken one was damaged or edited
    since: the reports skip it with a warning naming it rather than lose every other run."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"not a JSON object but {type(meta).__name__}")
    for key in _SIDECAR_OBJECTS:
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise ValueError(f"{key} is {type(meta[key]).__name__}, not an object")
    numbers = [(k, meta.get(k)) for k in _SIDECAR_NUMBERS] + [(f"Quality.{k}", v) for k, v in (meta.get("Quality") or {}).items()]
    for key, value in numbers:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} is {value!r}, not a number")
    return meta
