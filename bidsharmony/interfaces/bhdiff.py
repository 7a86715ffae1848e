"""The BlindHarmonyDiff node: a 1.2 mm volume in, its harmonized volume out (plus report inputs)."""

from __future__ import annotations

import json
import os
import time

from nipype.interfaces.base import Directory, SimpleInterface, traits

from bidsharmony.interfaces.volumetric import VolumeInputSpec, VolumeOutputSpec


class _BHDiffInputSpec(VolumeInputSpec):
    model = Directory(exists=True, mandatory=True, desc="bhdiff model folder")
    params = traits.Dict(mandatory=True, desc="BHDiffParams fields")
    device = traits.Str("auto", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class BHDiffHarmonize(SimpleInterface):
    input_spec = _BHDiffInputSpec
    output_spec = VolumeOutputSpec  # trace: Pearson r with the source through the refinement

    def _run_interface(self, runtime):
        import nibabel as nb
        import numpy as np
        import torch

        from bidsharmony.bhdiff.checkpoint import load_bhdiff_model
        from bidsharmony.bhdiff.volume import BHDiffParams, harmonize_volume_bhdiff
        from bidsharmony.device import device_label, resolve_device
        from bidsharmony.image.slices import cut
        from bidsharmony.metrics import harmonization_quality
        from bidsharmony.provenance import Provenance
        from bidsharmony.space import Space

        torch.set_num_threads(max(1, self.inputs.num_threads))
        device = resolve_device(self.inputs.device)
        unet, config = load_bhdiff_model(self.inputs.model, device=device)
        params = BHDiffParams(**self.inputs.params).validate()
        img = nb.load(self.inputs.in_file)
        vol = np.asanyarray(img.dataobj, dtype=np.float32)
        trace: dict = {}
        t0 = time.perf_counter()
        out = harmonize_volume_bhdiff(vol, unet, params, device=device, trace=trace)
        seconds = time.perf_counter() - t0
        self._results["out_file"] = os.path.join(runtime.cwd, "harmonized.nii.gz")
        nb.Nifti1Image(out, img.affine).to_filename(self._results["out_file"])
        self._results["trace"] = os.path.join(runtime.cwd, "trace.json")
        with open(self._results["trace"], "w") as f:
            json.dump(trace, f)
        # The same [0, 1] slices the flow method measures, so the two methods' reports compare.
        before, rec = cut(vol)
        after, _ = cut(out, offset=rec.offset)  # on the input's grid: slice k against slice k
        idx = rec.harmonize.astype(bool)
        target = config.get("target_histogram")
        hist, quality = harmonization_quality(before[idx], after[idx], None if target is None else np.asarray(target))
        self._results["histograms"] = os.path.join(runtime.cwd, "histograms.json")
        with open(self._results["histograms"], "w") as f:
            json.dump(hist, f)
        self._results["info"] = Provenance(
            method="bhdiff (3D rectified flow, BlindHarmonyDiff)",
            model={"Name": config.get("name"), "Sha256": config["weights_sha256"], "Preset": config.get("preset"),
                   "VoxelSize": Space.of_model(config).voxel_mm},
            parameters=params.to_dict(),
            device=device_label(device),
            torch_version=torch.__version__,
            slices_harmonized=int(idx.sum()),  # the slices with head, as the 2D method counts them
            slices_total=len(idx),
            harmonization_seconds=round(seconds, 3),
            quality=quality,
            intensity_scale="input",
            convergence_trace=trace,
        ).to_sidecar()
        return runtime
