"""Cut a volume into the model's slice grid, and put harmonized slices back."""

from __future__ import annotations

import os

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from bidsharmony.space import DEFAULT


class _SliceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="canonical isotropic volume")
    grid_shape = traits.Tuple(traits.Int, traits.Int, default=DEFAULT.slice_shape, usedefault=True)


class _SliceOutputSpec(TraitedSpec):
    slices = File(exists=True, desc="(Z, H, W) float32 slices in [0, 1] (.npy)")
    record = File(exists=True, desc="SliceRecord (.npz): how to undo the cut")


class SliceVolume(SimpleInterface):
    input_spec = _SliceInputSpec
    output_spec = _SliceOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb
        import numpy as np

        from bidsharmony.image.slices import cut

        volume = np.asanyarray(nb.load(self.inputs.in_file).dataobj, dtype=np.float32)
        slices, record = cut(volume, tuple(self.inputs.grid_shape))
        self._results["slices"] = os.path.join(runtime.cwd, "slices.npy")
        self._results["record"] = os.path.join(runtime.cwd, "record.npz")
        np.save(self._results["slices"], slices)
        record.save(self._results["record"])
        return runtime


class _ReassembleInputSpec(BaseInterfaceInputSpec):
    slices = File(exists=True, xor=["volume"], requires=["record"], desc="harmonized slices (.npy)")
    record = File(exists=True, desc="how the slices were cut (.npz)")
    volume = File(exists=True, xor=["slices"], desc="or: a harmonized volume on the resampled grid (3D methods)")
    resampled = File(exists=True, mandatory=True, desc="the volume the harmonization started from")
    in_file = File(exists=True, mandatory=True, desc="the original T1w (native grid, header)")
    output_space = traits.Enum("native", "harmonization", usedefault=True)
    standardisation = File(exists=True, desc="the intensity map ``resampled`` went through (.json): applied to the native voxels too")
    native = File(exists=True, desc="or: the native voxels already standardised and detail-matched (Standardise's native_file)")


class _ReassembleOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class Reassemble(SimpleInterface):
    """Harmonized slices -> volume, on the input's own grid (native) or on the 1.2 mm grid.

    Native space adds the harmonization's change, resampled, to the original voxels: the input's
    own resolution survives (a 0.7 mm scan is not blurred to 1.2 mm), and voxels the harmonization
    did not touch come back exactly as they were. With a standardisation, those voxels are first put
    through the same map (the input's own voxels, not a resampled copy), so the whole output is on
    the model's standard scale.
    """

    input_spec = _ReassembleInputSpec
    output_spec = _ReassembleOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb
        import numpy as np

        from bidsharmony.errors import ImageError
        from bidsharmony.image.io import load_t1w
        from bidsharmony.image.resample import resample_onto
        from bidsharmony.image.slices import SliceRecord, assemble

        res_img = nb.load(self.inputs.resampled)
        resampled = np.asanyarray(res_img.dataobj, dtype=np.float32)
        if isdefined(self.inputs.volume):
            harmonized = np.asanyarray(nb.load(self.inputs.volume).dataobj, dtype=np.float32)
        else:
            record = SliceRecord.load(self.inputs.record)
            if not record.harmonize.any():  # load_t1w refuses most such volumes up front; this is the backstop
                raise ImageError(f"{self.inputs.in_file}: no slice held enough head to harmonize; the output would be "
                                 "the input unchanged")
            harmonized = assemble(np.load(self.inputs.slices, allow_pickle=False), record, resampled)
        out = os.path.join(runtime.cwd, "harmonized.nii.gz")
        if self.inputs.output_space == "harmonization":
            img = nb.Nifti1Image(harmonized, res_img.affine)
            img.header.set_xyzt_units("mm")
        else:
            orig, data = load_t1w(self.inputs.in_file)
            if isdefined(self.inputs.native):
                data = np.asanyarray(nb.load(self.inputs.native).dataobj, dtype=np.float32)
            elif isdefined(self.inputs.standardisation):
                import json

                from bidsharmony.image.standardise import apply_record

                with open(self.inputs.standardisation) as f:
                    data = apply_record(data, json.load(f))
            change = resample_onto(harmonized - resampled, res_img.affine, data.shape, orig.affine)
            img = nb.Nifti1Image((data + change).astype(np.float32), orig.affine, header=orig.header)
            img.header.set_data_dtype(np.float32)
            img.header.set_slope_inter(1.0, 0.0)
        img.to_filename(out)
        self._results["out_file"] = out
        return runtime
