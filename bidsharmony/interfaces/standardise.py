"""Blind intensity standardisation of the resampled volume onto the model's standard scale."""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


class _StandardiseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="canonical isotropic volume (the resample node's output)")
    standard = traits.List(traits.Float, mandatory=True, desc="the model's standard landmarks (read once, when the workflow is built)")
    percentiles = traits.List(traits.Float, mandatory=True, desc="the percentiles they are of")
    source = traits.Str("", usedefault=True, desc="the original T1w, named in errors")


class _StandardiseOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the volume on the model's standard scale")
    standardisation = File(exists=True, desc="the map: percentiles, source and standard landmarks (.json)")


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
        out = nb.Nifti1Image(std.standardise(volume, standard, percentiles, source_landmarks=source), img.affine)
        out.header.set_xyzt_units("mm")
        self._results["out_file"] = os.path.join(runtime.cwd, "standardised.nii.gz")
        out.to_filename(self._results["out_file"])
        self._results["standardisation"] = os.path.join(runtime.cwd, "standardisation.json")
        with open(self._results["standardisation"], "w") as f:
            json.dump(std.record(source, standard, percentiles), f)
        return runtime
