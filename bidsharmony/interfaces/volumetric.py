"""The specs every whole-volume harmonization node declares: what ``workflows.volumetric.init_volume_wf``
connects (the canonical 1.2 mm volume in; the harmonized volume and the report inputs out)."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec, traits


class VolumeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="canonical 1.2 mm volume (the resample node's output)")


class VolumeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonized volume on the same 1.2 mm grid")
    info = traits.Dict(desc="provenance for the sidecar (provenance.Provenance.to_sidecar)")
    trace = File(exists=True, desc="the method's convergence trace (.json)")
    histograms = File(exists=True, desc="slice-intensity densities before/after and the model's target (.json)")
