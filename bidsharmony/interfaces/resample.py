"""Load a T1w, reorient to RAS and resample to the model's isotropic voxel size (antspyx)."""

from __future__ import annotations

import os

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from bidsharmony.space import DEFAULT


class _ResampleInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w image, any orientation")
    voxel_size = traits.Float(DEFAULT.voxel_mm, usedefault=True, desc="isotropic voxel size (mm)")
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _ResampleOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="canonical (RAS) isotropic image, float32")


class ResampleToHarmonizationSpace(SimpleInterface):
    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from bidsharmony.image.io import load_t1w
        from bidsharmony.image.resample import canonical, resample_isotropic

        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(self.inputs.num_threads)
        img, data = load_t1w(self.inputs.in_file)
        data, affine = canonical(data, img.affine)
        data, affine = resample_isotropic(data, affine, self.inputs.voxel_size)
        out = os.path.join(runtime.cwd, "resampled.nii.gz")
        nb.Nifti1Image(data, affine).to_filename(out)
        self._results["out_file"] = out
        return runtime
