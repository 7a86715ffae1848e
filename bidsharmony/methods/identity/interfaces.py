"""The identity method's node."""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import SimpleInterface

from bidsharmony.interfaces.volumetric import VolumeInputSpec, VolumeOutputSpec


class IdentityHarmonize(SimpleInterface):
    """The harmonization node's outputs for a volume left as it is."""

    input_spec = VolumeInputSpec
    output_spec = VolumeOutputSpec  # out_file: the same volume; trace: empty

    def _run_interface(self, runtime):
        import nibabel as nb
        import numpy as np

        from bidsharmony.image.slices import cut
        from bidsharmony.metrics import harmonization_quality
        from bidsharmony.provenance import Provenance

        vol = np.asanyarray(nb.load(self.inputs.in_file).dataobj, dtype=np.float32)
        slices, record = cut(vol)
        idx = record.harmonize.astype(bool)
        hist, quality = harmonization_quality(slices[idx], slices[idx], None)
        paths = {k: os.path.join(runtime.cwd, f"{k}.json") for k in ("trace", "histograms")}
        for key, value in (("trace", {}), ("histograms", hist)):
            with open(paths[key], "w") as f:
                json.dump(value, f)
        self._results.update(paths)
        self._results["out_file"] = self.inputs.in_file
        self._results["info"] = Provenance(
            method="identity (no harmonization)", model={"Name": "none"}, slices_harmonized=0, slices_total=len(idx),
            harmonization_seconds=0.0, quality=quality, intensity_scale="input",
        ).to_sidecar()
        return runtime
