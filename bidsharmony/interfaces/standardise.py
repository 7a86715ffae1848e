"""Blind intensity standardisation of the resampled volume onto the model's standard scale, then,
on the native voxels, the foreign part of a bias field undone (where the model holds the target's
typical field) and detail matching (where it holds a detail band)."""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

class _StandardiseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="canonical isotropic volume (the resample node's output)")
    standard = traits.List(traits.Float, mandatory=True, desc="the model's standard landmarks (read once, when the workflow is built)")
    percentiles = traits.List(traits.Float, mandatory=True, desc="the percentiles they are of")
    source = traits.Str("", usedefault=True, desc="the original T1w, named in errors (and read, to match its detail)")
    band = traits.List(traits.Float, minlen=3, maxlen=3, desc="the model's detail band (min, mean, max): when given, the "
                       "native voxels are standardised and detail-matched here (``bidsharmony.image.detail``)")
    target_voxel = traits.List(traits.Float, minlen=3, maxlen=3, desc="the target's acquired voxel size (RAS, mm) the band's "
                               "levels are measured at; unset: as the source was acquired")
    denoiser_model = traits.Str(desc="a model folder holding a learned denoiser, used above the band instead of non-local means")
    field_model = traits.Str(desc="a model folder holding the target's typical field (``bidsharmony.image.field``): the part of "
                             "the volume's field the target lacks is undone on the native voxels, which are then standardised again")


class _StandardiseOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the volume on the model's standard scale")
    standardisation = File(exists=True, desc="the map: percentiles, source and standard landmarks (.json), and the "
                           "detail matching's record under Detail")
    native_file = File(exists=True, desc="with a band or a field: the native voxels standardised, their field undone and "
                       "detail-matched (what Reassemble starts from)")


class Standardise(SimpleInterface):
    """Map the volume's landmarks onto the model's (``bidsharmony.image.standardise``), volume-wide,
    before any slicing: every later stage works on the target's intensity scale."""

    input_spec = _StandardiseInputSpec
    output_spec = _StandardiseOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb
        import numpy as np

        from bidsharmony.errors import ImageError
        from bidsharmony.image import standardise as std

        standard, percentiles = np.asarray(self.inputs.standard, np.float64), list(self.inputs.percentiles)
        img = nb.load(self.inputs.in_file)
        volume = np.asanyarray(img.dataobj, dtype=np.float32)
        try:
            source = std.volume_landmarks(volume, percentiles, img.header.get_zooms()[:3])
        except ValueError as e:
            raise ImageError(f"{self.inputs.source or self.inputs.in_file}: cannot standardise its intensities ({e})") from None
        standardised = std.standardise(volume, standard, percentiles, source_landmarks=source)
        record = std.record(source, standard, percentiles)
        if not (isdefined(self.inputs.band) or isdefined(self.inputs.field_model)):
            native = None
        else:  # both stages act on the original T1w's voxels, put through the same map: read and mapped once
            orig, data = self._source()
            native = std.apply_record(data, record)
        if isdefined(self.inputs.band):
            standardised, native, record["Detail"] = self._match_detail(standardised, img.affine, orig, native)
        if isdefined(self.inputs.field_model):
            if "Detail" in record and record["Detail"]["Action"] != "none":
                # Noise, blur and tissue contrast mislead N4, and each moves the detail level out of the band.
                record["Field"] = {"Method": "n4-typical", "Weight": 0.0, "Skipped": "the detail stage changed the volume"}
            else:
                zooms = img.header.get_zooms()[:3]
                standardised, native, record["Field"] = self._undo_field(volume, zooms, standardised, img.affine, orig, data, native)
        if native is not None:
            self._write_native(native, orig, runtime)
        out = nb.Nifti1Image(standardised, img.affine)
        out.header.set_xyzt_units("mm")
        self._results["out_file"] = os.path.join(runtime.cwd, "standardised.nii.gz")
        out.to_filename(self._results["out_file"])
        self._results["standardisation"] = os.path.join(runtime.cwd, "standardisation.json")
        with open(self._results["standardisation"], "w") as f:
            json.dump(record, f)
        return runtime

    def _source(self):
        """(the original T1w's image, its native voxels)."""
        from bidsharmony.image.io import load_t1w

        if not self.inputs.source:
            raise ValueError("Standardise: the field and detail stages need the original T1w as source")
        return load_t1w(self.inputs.source)

    def _undo_field(self, volume, zooms, standardised, affine, orig, data, native):
        """The foreign part of the native voxels' field undone (``image.field.undo``: ``data`` as acquired,
        ``native`` through the first map), their landmarks measured again on this grid's first landmark
        region: returns (this grid's volume, the native volume, the field's record)."""
        import numpy as np

        from bidsharmony.errors import ImageError
        from bidsharmony.flow.checkpoint import model_field
        from bidsharmony.image import field
        from bidsharmony.image.resample import resample_onto
        from bidsharmony.image.standardise import landmark_region

        try:
            native, rec = field.undo(data, orig.affine, native, model_field(self.inputs.field_model),
                                     np.asarray(self.inputs.standard, np.float64), list(self.inputs.percentiles),
                                     (volume.shape, affine), landmark_region(volume, zooms))
        except ValueError as e:
            raise ImageError(f"{self.inputs.source}: cannot estimate its bias field ({e})") from None
        if rec["Weight"] == 0:
            return standardised, native, rec
        return resample_onto(native, orig.affine, volume.shape, affine).astype(np.float32), native, rec

    def _match_detail(self, standardised, affine, orig, native):
        """Match the native voxels' detail level (``native``: standardised with the same map) on this grid; returns
        (this grid's volume: unchanged where the level was in the band, else the matched native volume
        resampled here; the native volume; the matching's record)."""
        import numpy as np

        from bidsharmony.errors import ImageError
        from bidsharmony.image.detail import match_detail
        from bidsharmony.image.resample import resample_onto

        try:
            target = self.inputs.target_voxel if isdefined(self.inputs.target_voxel) else None
            denoiser = None
            if isdefined(self.inputs.denoiser_model):
                from bidsharmony.flow.checkpoint import model_denoiser

                denoiser = model_denoiser(self.inputs.denoiser_model)
            native, detail = match_detail(native, orig.affine, self.inputs.band, (standardised.shape, affine), target, denoiser)
        except ValueError as e:
            raise ImageError(f"{self.inputs.source}: cannot measure its detail level ({e})") from None
        if detail["Action"] != "none":
            standardised = resample_onto(native, orig.affine, standardised.shape, affine)
        if detail["Action"] == "denoise" and detail["LevelReached"] > detail["Band"][2]:
            import logging

            # Full denoising left it above the band: detail the target's images lack, or noise the
            # denoiser cannot remove; either way the output still differs from the target's in kind.
            logging.getLogger("bidsharmony").warning(
                "%s: detail level %.3f is still above the model's band (%.3f) after full denoising: the scan holds finer "
                "detail or more noise than the target's images; consider --detail none (docs/method.md §8)",
                self.inputs.source, detail["LevelReached"], detail["Band"][2])
        return standardised.astype(np.float32), native, detail

    def _write_native(self, native, orig, runtime):
        import nibabel as nb
        import numpy as np

        self._results["native_file"] = os.path.join(runtime.cwd, "native.nii")  # read once by Reassemble: not worth compressing
        img = nb.Nifti1Image(np.asarray(native, np.float32), orig.affine, header=orig.header)
        img.header.set_data_dtype(np.float32)
        img.header.set_slope_inter(1.0, 0.0)
        img.to_filename(self._results["native_file"])
