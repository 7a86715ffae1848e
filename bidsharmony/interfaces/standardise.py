"""Blind intensity standardisation of the resampled volume onto the model's standard scale, then,
on the native voxels, detail matching (where the model holds a detail band) and the foreign part of
a bias field undone (where it holds the target's typical field): the stages of
``bidsharmony.image.intensity``, with the files around them."""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits


class _StandardiseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="canonical isotropic volume (the resample node's output)")
    standard = traits.List(traits.Float, mandatory=True, desc="the model's standard landmarks (read once, when the workflow is built)")
    percentiles = traits.List(traits.Float, mandatory=True, desc="the percentiles they are of")
    class_standard = traits.List(traits.Float, desc="the model's class landmarks: when given, the class pass follows the "
                                 "percentile map (``bidsharmony.image.standardise.class_pass``)")
    source = traits.Str("", usedefault=True, desc="the original T1w, named in errors (and read, to match its detail)")
    band = traits.List(traits.Float, minlen=3, maxlen=3, desc="the model's detail band (min, mean, max): when given, the "
                       "native voxels are standardised and detail-matched here (``bidsharmony.image.detail``)")
    target_voxel = traits.List(traits.Float, minlen=3, maxlen=3, desc="the target's acquired voxel size (RAS, mm) the band's "
                               "levels are measured at; unset: as the source was acquired")
    denoiser_model = traits.Str(desc="a model folder holding a learned denoiser, used above the band instead of non-local means")
    brain_model = traits.Str(desc="a model folder holding a learned brain mask (``bidsharmony.image.brainmask``): the "
                             "landmarks are measured in the brain it finds; ``standard`` and ``class_standard`` are then "
                             "the model's landmarks measured in it")
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
        from bidsharmony.image.intensity import StageError, prepare

        img = nb.load(self.inputs.in_file)
        volume = np.asanyarray(img.dataobj, dtype=np.float32)
        band = self.inputs.band if isdefined(self.inputs.band) else None
        typical = denoiser = orig = native = None
        if isdefined(self.inputs.field_model):
            from bidsharmony.flow.checkpoint import model_field

            typical = model_field(self.inputs.field_model)
        if band is not None and isdefined(self.inputs.denoiser_model):
            from bidsharmony.flow.checkpoint import model_denoiser

            denoiser = model_denoiser(self.inputs.denoiser_model)
        brain = None
        if isdefined(self.inputs.brain_model):
            from bidsharmony.flow.checkpoint import model_brainmask

            brain = model_brainmask(self.inputs.brain_model)[0]
        if band is not None or typical is not None or brain is not None:  # they act on the original T1w's voxels
            orig, data = self._source()
            native = (data, orig.affine)
        classes = self.inputs.class_standard if isdefined(self.inputs.class_standard) else None
        try:
            done = prepare(volume, img.affine, self.inputs.standard, self.inputs.percentiles, class_standard=classes,
                           zooms=img.header.get_zooms()[:3], native=native, band=band,
                           target_voxel=self.inputs.target_voxel if isdefined(self.inputs.target_voxel) else None,
                           denoiser=denoiser, typical=typical, brain=brain, name=self.inputs.source)
        except StageError as e:
            raise ImageError(f"{self.inputs.source or self.inputs.in_file}: {e}") from None
        if done.native is not None:
            self._write_native(done.native, orig, runtime)
        out = nb.Nifti1Image(done.grid, img.affine)
        out.header.set_xyzt_units("mm")
        self._results["out_file"] = os.path.join(runtime.cwd, "standardised.nii.gz")
        out.to_filename(self._results["out_file"])
        self._results["standardisation"] = os.path.join(runtime.cwd, "standardisation.json")
        with open(self._results["standardisation"], "w") as f:
            json.dump(done.record, f)
        return runtime

    def _source(self):
        """(the original T1w's image, its native voxels)."""
        from bidsharmony.image.io import load_t1w

        if not self.inputs.source:
            raise ValueError("Standardise: the field and detail stages need the original T1w as source")
        return load_t1w(self.inputs.source)

    def _write_native(self, native, orig, runtime):
        import nibabel as nb
        import numpy as np

        self._results["native_file"] = os.path.join(runtime.cwd, "native.nii")  # read once by Reassemble: not worth compressing
        img = nb.Nifti1Image(np.asarray(native, np.float32), orig.affine, header=orig.header)
        img.header.set_data_dtype(np.float32)
        img.header.set_slope_inter(1.0, 0.0)
        img.to_filename(self._results["native_file"])
