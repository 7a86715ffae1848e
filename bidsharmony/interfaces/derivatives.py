"""Write one harmonized image and its sidecar into the derivatives dataset, atomically."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="harmonized image in the work directory")
    out_dir = traits.Str(mandatory=True)
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the source T1w")
    source_relpath = traits.Str(mandatory=True, desc="source path relative to BIDS_DIR")
    output_space = traits.Enum("native", "harmonization", usedefault=True)
    info = traits.Dict(desc="provenance from the harmonization node")
    description = traits.Str("T1w harmonized to the model's target domain", usedefault=True, desc="the method's sidecar Description")


class _SinkOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    out_sidecar = File(exists=True)


class DerivativesSink(SimpleInterface):
    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    _always_run = True  # outputs live outside the work directory: always (re)write them

    def _run_interface(self, runtime):
        from bidsharmony import __version__
        from bidsharmony.bids import bids_uri, derivative_path
        from bidsharmony.outputs import atomic_copy, atomic_write_json

        native = self.inputs.output_space == "native"
        out = derivative_path(self.inputs.out_dir, self.inputs.entities, res=None if native else "1p2")
        sidecar = out.with_name(out.name.replace(".nii.gz", ".json"))
        meta = {
            "Description": self.inputs.description,
            "Sources": [bids_uri(self.inputs.source_relpath)],
            "OutputSpace": "native grid of the source" if native else "RAS, isotropic, the model's voxel size",
            "SkullStripped": False,  # required by BIDS-Derivatives for anatomical images: the whole head is kept
            "SoftwareName": "bidsharmony",
            "SoftwareVersion": __version__,
        }
        meta.update(self.inputs.info or {})
        atomic_copy(self.inputs.in_file, out, root=self.inputs.out_dir)
        atomic_write_json(sidecar, meta, root=self.inputs.out_dir)
        self._results["out_file"] = str(out)
        self._results["out_sidecar"] = str(sidecar)
        return runtime
