"""One run's provenance: what a method's harmonization node records, the quality node completes,
the sink writes into the output's sidecar, and the reports and the group level read back.

One dataclass, so that the sidecar's field names live in one place. Between Nipype nodes it
travels as its sidecar dict (``to_sidecar``/``from_sidecar``): traits carry plain JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# Field -> sidecar key. Optional fields left at None are not written (a 3D method has no
# fallback slices; a run without standardisation no standardisation record).
SIDECAR_KEYS = {
    "method": "Method",
    "model": "Model",
    "parameters": "Parameters",
    "device": "Device",
    "torch_version": "TorchVersion",
    "slices_harmonized": "SlicesHarmonized",
    "slices_total": "SlicesTotal",
    "fallback_slices": "FallbackSlices",
    "harmonization_seconds": "HarmonizationSeconds",
    "quality": "Quality",
    "intensity_scale": "IntensityScale",
    "standardisation": "Standardisation",
    "convergence_trace": "ConvergenceTrace",
    "source_scanner": "SourceScanner",
    "software_dependencies": "SoftwareDependencies",
}


@dataclass
class Provenance:
    """What one harmonization did, in the sidecar's terms.

    ``model``: Name, Sha256, Preset, … of the model folder (and what its folder says of its quality);
    ``parameters``: the method's parameters, every one; ``quality``: SimilarityToInput, histogram
    distances, SliceStepRatio; ``intensity_scale``: ``standard`` (the model's, after the
    standardisation) or ``input``.
    """

    method: str
    model: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    slices_harmonized: int | None = None
    slices_total: int | None = None
    harmonization_seconds: float | None = None
    quality: dict = field(default_factory=dict)
    device: str | None = None
    torch_version: str | None = None
    fallback_slices: int | None = None
    intensity_scale: str | None = None
    standardisation: dict | None = None
    convergence_trace: dict | None = None
    source_scanner: dict | None = None
    software_dependencies: dict | None = None

    def to_sidecar(self) -> dict:
        """The sidecar's fields, in a fixed order; fields at None are left out."""
        return {SIDECAR_KEYS[f.name]: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_sidecar(cls, meta: dict) -> Provenance:
        """From a sidecar (or a node's info): its provenance fields; the sink's own (Sources, …) are not."""
        names = {key: name for name, key in SIDECAR_KEYS.items()}
        values = {names[k]: v for k, v in meta.items() if k in names}
        values.setdefault("method", "")
        return cls(**values)
