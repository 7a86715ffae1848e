"""The flow harmonization node: slices in, harmonized slices out, on the chosen device."""

from __future__ import annotations

import json
import os
import time

from nipype.interfaces.base import BaseInterfaceInputSpec, Directory, File, SimpleInterface, TraitedSpec, isdefined, traits


class _HarmonizeInputSpec(BaseInterfaceInputSpec):
    slices = File(exists=True, mandatory=True)
    record = File(exists=True, mandatory=True)
    model = Directory(exists=True, mandatory=True, desc="model folder")
    params = traits.Dict(mandatory=True, desc="HarmonizeParams fields")
    device = traits.Str("auto", usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    standardisation = File(exists=True, desc="the standardisation the slices went through (.json), for the sidecar")
    unstandardised = File(exists=True, desc="the resampled volume before standardisation: the 'before' of the quality figures")


class _HarmonizeOutputSpec(TraitedSpec):
    slices = File(exists=True, desc="harmonized slices (.npy)")
    info = traits.Dict(desc="provenance for the sidecar")
    trace = File(exists=True, desc="per-iteration objective terms (.json)")
    histograms = File(exists=True, desc="slice-intensity densities before/after and the model's target (.json)")


class Harmonize(SimpleInterface):
    input_spec = _HarmonizeInputSpec
    output_spec = _HarmonizeOutputSpec

    def _run_interface(self, runtime):
        import numpy as np
        import torch

        from bidsharmony.device import device_label, resolve_device
        from bidsharmony.flow.checkpoint import load_model
        from bidsharmony.harmonize.solvers import HarmonizeParams, Trace
        from bidsharmony.harmonize.volume import check_grid, harmonize_volume
        from bidsharmony.image.slices import SliceRecord
        from bidsharmony.provenance import Provenance
        from bidsharmony.space import Space

        torch.set_num_threads(max(1, self.inputs.num_threads))
        device = resolve_device(self.inputs.device)
        model = load_model(self.inputs.model, device=device)
        params = HarmonizeParams(**self.inputs.params).validate()
        record = SliceRecord.load(self.inputs.record)
        check_grid(model, record, str(self.inputs.model))
        slices = np.load(self.inputs.slices, allow_pickle=False)
        trace = Trace()
        t0 = time.perf_counter()
        out = harmonize_volume(slices, record, model, params, device=device, trace=trace)
        seconds = time.perf_counter() - t0
        self._results["slices"] = os.path.join(runtime.cwd, "harmonized.npy")
        np.save(self._results["slices"], out)
        self._results["trace"] = os.path.join(runtime.cwd, "trace.json")
        with open(self._results["trace"], "w") as f:
            json.dump(trace.to_dict(), f)
        from bidsharmony.metrics import harmonization_quality

        idx = record.harmonize.astype(bool)
        target = model.extras.get("target_histogram")
        before = slices
        if isdefined(self.inputs.unstandardised):  # the whole change, standardisation included, is the run's
            import nibabel as nb

            from bidsharmony.image.slices import cut

            raw = np.asanyarray(nb.load(self.inputs.unstandardised).dataobj, dtype=np.float32)
            before = cut(raw, tuple(record.grid_shape), offset=record.offset)[0]
        hist, quality = harmonization_quality(before[idx], out[idx], None if target is None else target.cpu().numpy())
        self._results["histograms"] = os.path.join(runtime.cwd, "histograms.json")
        with open(self._results["histograms"], "w") as f:
            json.dump(hist, f)
        standardisation = None
        if isdefined(self.inputs.standardisation):
            with open(self.inputs.standardisation) as f:
                standardisation = json.load(f)
        self._results["info"] = Provenance(
            method="flow (2D normalizing-flow prior, BlindHarmony)",
            model={
                "Name": model.name,
                "Sha256": model.sha256,
                "Preset": model.config.get("preset"),
                "SliceShape": list(model.flow.cfg.slice_shape),
                "VoxelSize": Space.of_model(model.config).voxel_mm,
            },
            parameters=params.to_dict(),
            device=device_label(device),
            torch_version=torch.__version__,
            slices_harmonized=int(record.harmonize.sum()),
            slices_total=len(record.harmonize),
            fallback_slices=int(sum(trace.fallbacks)),
            harmonization_seconds=round(seconds, 3),
            quality=quality,
            # Which intensity scale the output is on: two scanners' outputs compare voxel for voxel only on the standard one.
            intensity_scale="standard" if standardisation is not None else "input",
            standardisation=standardisation,
            # Per-iteration means over slices: similarity to the source, masked edge term, |z|.
            convergence_trace={k: [round(v, 6) for v in vals] for k, vals in trace.to_dict().items()},
        ).to_sidecar()
        return runtime
