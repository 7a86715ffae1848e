"""The per-run report node: quality metrics into the sidecar, figures into OUT_DIR/sub-X/figures."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


class _ReportInputSpec(BaseInterfaceInputSpec):
    source = File(exists=True, mandatory=True, desc="the input T1w")
    harmonized = File(exists=True, mandatory=True, desc="the harmonized T1w (native or 1.2 mm grid)")
    info = traits.Dict(mandatory=True, desc="provenance from the harmonization node")
    histograms = File(exists=True, mandatory=True, desc="JSON: slice histograms before/after and the target's")
    trace = File(exists=True, mandatory=True, desc="JSON: objective terms per iteration")
    out_dir = traits.Str(mandatory=True)
    entities = traits.Dict(mandatory=True)
    scanner = traits.Dict(desc="the source's scanner fields from its BIDS sidecar")


class _ReportOutputSpec(TraitedSpec):
    info = traits.Dict(desc="info with Quality and SourceScanner added")
    figures = traits.List(File(exists=True))


class ReportFigures(SimpleInterface):
    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True  # the figures live in OUT_DIR, outside the work directory: always (re)write

    def _run_interface(self, runtime):
        import json
        from pathlib import Path

        import nibabel as nb
        import numpy as np

        from bidsharmony.bids import run_stem
        from bidsharmony.image.resample import resample_onto
        from bidsharmony.metrics import head_mask, slice_step_ratio
        from bidsharmony.outputs import ensure_inside
        from bidsharmony.reports import figures

        out_img = nb.as_closest_canonical(nb.load(self.inputs.harmonized))
        after = np.asanyarray(out_img.dataobj, dtype=np.float32)
        src = nb.as_closest_canonical(nb.load(self.inputs.source))
        before = np.nan_to_num(np.asanyarray(src.dataobj, dtype=np.float32))
        if before.shape != after.shape or not np.allclose(src.affine, out_img.affine, atol=1e-3):
            before = resample_onto(before, src.affine, after.shape, out_img.affine)  # harmonization space
        hist = json.loads(Path(self.inputs.histograms).read_text())
        trace = json.loads(Path(self.inputs.trace).read_text())
        info = dict(self.inputs.info)
        quality = dict(info.get("Quality", {}))
        quality["SliceStepRatio"] = round(slice_step_ratio(after, before, head_mask(before)), 4)
        info["Quality"] = quality
        if self.inputs.scanner:
            info["SourceScanner"] = dict(self.inputs.scanner)

        folder = Path(self.inputs.out_dir) / f"sub-{self.inputs.entities['subject']}" / "figures"
        ensure_inside(folder, self.inputs.out_dir)
        stem = run_stem(self.inputs.entities)
        paths = [folder / f"{stem}_desc-{d}_T1w.png" for d in ("beforeafter", "histogram", "convergence")]
        figures.before_after(before, after, paths[0], stem)
        figures.histograms(np.array(hist["before"]), np.array(hist["after"]),
                           np.array(hist["target"]) if hist.get("target") else None, paths[1], stem)
        figures.convergence(trace, paths[2], stem)
        self._results["info"] = info
        self._results["figures"] = [str(p) for p in paths]
        return runtime
