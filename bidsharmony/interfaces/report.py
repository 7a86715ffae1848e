"""Per-run nodes beside the derivative: the quality figures that go into the sidecar
(``RunQuality``, on the way from harmonization to the sink) and the report's figures
(``ReportFigures``, beside the sink: a figure that fails to draw never holds back the derivative).
"""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

# Versions of the libraries the methods paragraph cites, recorded with every run.
DEPENDENCIES = ("nipype", "antspyx", "pybids", "nibabel")


def load_pair(source, harmonized):
    """(before, after, affine): the input and the harmonized image as RAS float32 arrays on the
    harmonized image's grid (the input resampled onto it when the grids differ)."""
    import nibabel as nb
    import numpy as np

    from bidsharmony.image.resample import resample_onto

    out_img = nb.as_closest_canonical(nb.load(harmonized))
    after = np.asanyarray(out_img.dataobj, dtype=np.float32)
    src = nb.as_closest_canonical(nb.load(source))
    before = np.nan_to_num(np.asanyarray(src.dataobj, dtype=np.float32))
    if before.shape != after.shape or not np.allclose(src.affine, out_img.affine, atol=1e-3):
        before = resample_onto(before, src.affine, after.shape, out_img.affine)  # harmonization space
    return before, after, out_img.affine


def dependency_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in DEPENDENCIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


class _QualityInputSpec(BaseInterfaceInputSpec):
    source = File(exists=True, mandatory=True, desc="the input T1w")
    harmonized = File(exists=True, mandatory=True, desc="the harmonized T1w (native or 1.2 mm grid)")
    info = traits.Dict(mandatory=True, desc="provenance from the harmonization node")
    scanner = traits.Dict(desc="the source's scanner fields from its BIDS sidecar")
    model_facts = traits.Dict(desc="facts about the model folder for the sidecar's Model (validation bits/dim, …)")


class _QualityOutputSpec(TraitedSpec):
    info = traits.Dict(desc="info with Quality.SliceStepRatio, SourceScanner, the model's facts and dependency versions")


class RunQuality(SimpleInterface):
    """The sidecar's whole-volume quality figure (slice-to-slice steps relative to the input's),
    the source's scanner and the model's recorded quality: everything the sink needs, no drawing."""

    input_spec = _QualityInputSpec
    output_spec = _QualityOutputSpec

    def _run_interface(self, runtime):
        from bidsharmony.image.slices import head_mask
        from bidsharmony.metrics import slice_step_ratio
        from bidsharmony.provenance import Provenance

        before, after, _ = load_pair(self.inputs.source, self.inputs.harmonized)
        prov = Provenance.from_sidecar(self.inputs.info)
        prov.quality = {**prov.quality, "SliceStepRatio": round(slice_step_ratio(after, before, head_mask(before)), 4)}
        if self.inputs.scanner:
            prov.source_scanner = dict(self.inputs.scanner)
        if self.inputs.model_facts:
            prov.model = {**prov.model, **self.inputs.model_facts}
        prov.software_dependencies = dependency_versions()
        info = prov.to_sidecar()
        self._results["info"] = info
        return runtime


class _ReportInputSpec(BaseInterfaceInputSpec):
    source = File(exists=True, mandatory=True, desc="the input T1w")
    harmonized = File(exists=True, mandatory=True, desc="the harmonized T1w (native or 1.2 mm grid)")
    histograms = File(exists=True, mandatory=True, desc="JSON: slice histograms before/after and the target's")
    trace = File(exists=True, mandatory=True, desc="JSON: objective terms per iteration")
    out_dir = traits.Str(mandatory=True)
    entities = traits.Dict(mandatory=True)


class _ReportOutputSpec(TraitedSpec):
    figures = traits.List(File(exists=True), desc="the figures drawn")
    failed = traits.List(traits.Str, desc="'name: cause' of each figure that could not be drawn")


class ReportFigures(SimpleInterface):
    """The run's figures in OUT_DIR/sub-X/figures: the before/after flip view and the difference
    (SVG mosaics), histograms and convergence (PNG). Each figure that fails is logged and left
    out (the report says it is missing); the node itself does not fail for it."""

    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True  # the figures live in OUT_DIR, outside the work directory: always (re)write

    def _run_interface(self, runtime):
        import json
        import logging
        from pathlib import Path

        import numpy as np

        from bidsharmony.bids import run_stem
        from bidsharmony.outputs import ensure_inside
        from bidsharmony.reports import figures

        log = logging.getLogger("bidsharmony")
        folder = Path(self.inputs.out_dir) / f"sub-{self.inputs.entities['subject']}" / "figures"
        ensure_inside(folder, self.inputs.out_dir)
        stem = run_stem(self.inputs.entities)
        path = {d: folder / f"{stem}_desc-{d}_T1w.{ext}" for d, ext, _ in figures.RUN_FIGURES}
        done, failed = [], []

        def forget(figure):
            """An earlier run's figure would pass for this run's: removed, where it can be."""
            try:
                figure.unlink(missing_ok=True)
            except OSError:
                pass

        def draw(name, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - one figure must not cost the run its report or outputs
                log.warning("%s: figure %s not drawn: %s: %s", stem, name, type(e).__name__, e)
                failed.append(f"{name}: {type(e).__name__}: {e}")
                forget(path[name])
            else:
                done.append(str(path[name]))

        try:
            before, after, affine = load_pair(self.inputs.source, self.inputs.harmonized)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: images not readable for the figures: %s: %s", stem, type(e).__name__, e)
            for name in ("beforeafter", "difference"):
                failed.append(f"{name}: images not readable ({type(e).__name__}: {e})")
                forget(path[name])
        else:
            draw("beforeafter", lambda: figures.before_after(before, after, affine, path["beforeafter"], stem))
            draw("difference", lambda: figures.difference(before, after, affine, path["difference"], stem))

        def histograms():
            hist = json.loads(Path(self.inputs.histograms).read_text())
            target = np.array(hist["target"]) if hist.get("target") else None
            figures.histograms(np.array(hist["before"]), np.array(hist["after"]), target, path["histogram"], stem)

        draw("histogram", histograms)
        trace = lambda: json.loads(Path(self.inputs.trace).read_text())  # noqa: E731
        draw("convergence", lambda: figures.convergence(trace(), path["convergence"], stem))
        self._results["figures"] = done
        self._results["failed"] = failed
        return runtime

