"""Write what a preprocessing workflow produced, per run, into one JSON file at a given path: how
the train level receives its inputs from a workflow's outputnode (not by searching the executed graph)."""

from __future__ import annotations

import json

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


class _ManifestInputSpec(BaseInterfaceInputSpec):
    subjects = traits.List(traits.Str, mandatory=True, desc="each run's subject label")
    sources = traits.List(traits.Str, mandatory=True, desc="each run's original T1w")
    resampled = traits.List(File(exists=True), mandatory=True, desc="each run's resampled volume")
    slices = traits.List(File(exists=True), mandatory=True, desc="each run's slices (.npy)")
    records = traits.List(File(exists=True), mandatory=True, desc="each run's slice record (.npz)")
    out_file = traits.Str(mandatory=True, desc="where to write the manifest (absolute path)")


class _ManifestOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the manifest: a JSON list, one object per run")


class WriteManifest(SimpleInterface):
    """One JSON object per run, in the runs' order: subject, source, resampled, slices, record."""

    input_spec = _ManifestInputSpec
    output_spec = _ManifestOutputSpec

    def _run_interface(self, runtime):
        columns = (self.inputs.subjects, self.inputs.sources, self.inputs.resampled, self.inputs.slices, self.inputs.records)
        if len({len(c) for c in columns}) != 1:
            raise ValueError(f"manifest: {', '.join(str(len(c)) for c in columns)} entries per column; expected one per run")
        rows = [dict(zip(("subject", "source", "resampled", "slices", "record"), row)) for row in zip(*columns)]
        with open(self.inputs.out_file, "w") as f:
            json.dump(rows, f, indent=1)
        self._results["out_file"] = self.inputs.out_file
        return runtime
