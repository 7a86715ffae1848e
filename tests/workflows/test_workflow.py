"""init_harmonize_wf embedded in another Nipype workflow, as fMRIPrep-style pipelines would."""

import json

import nibabel as nb
import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bidsharmony.workflows.harmonize import harmonize_mem_gb, init_harmonize_wf


def _collect(harmonized, info, trace):
    return harmonized, info, trace


def test_harmonize_wf_embeds_and_runs(example_bids, tiny_model, tmp_path):
    t1w = example_bids / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz"
    parent = pe.Workflow(name="parent", base_dir=str(tmp_path))
    src = pe.Node(niu.IdentityInterface(fields=["anat"]), name="anat_source")
    src.inputs.anat = str(t1w)
    hwf = init_harmonize_wf(model=tiny_model, params={"iterations": 2}, device="cpu")
    collect = pe.Node(niu.Function(function=_collect, input_names=["harmonized", "info", "trace"], output_names=["harmonized", "info", "trace"]), name="collect")
    parent.connect([
        (src, hwf, [("anat", "inputnode.t1w")]),
        (hwf, collect, [("outputnode.harmonized", "harmonized"), ("outputnode.info", "info"), ("outputnode.trace", "trace")]),
    ])  # fmt: skip
    graph = parent.run(plugin="Linear")
    node = next(n for n in graph.nodes() if n.name == "collect")
    out = node.result.outputs
    img, ref = nb.load(out.harmonized), nb.load(t1w)
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    assert out.info["Parameters"]["iterations"] == 2
    assert len(json.loads(open(out.trace).read())["similarity"]) == 2


def test_nodes_declare_resources(tiny_model):
    """The scheduler sees the threads each node uses and a memory request that grows with the batch."""
    config = json.loads((tiny_model / "config.json").read_text())
    small, large = (init_harmonize_wf(model=tiny_model, params={"batch_size": b}, omp_nthreads=4) for b in (8, 512))
    assert small.get_node("harmonize").n_procs == small.get_node("slices_wf.resample").n_procs == 4
    assert 1.0 <= small.get_node("harmonize").mem_gb < large.get_node("harmonize").mem_gb == harmonize_mem_gb(config, 512)
    assert all(small.get_node(n).mem_gb >= 1.0 for n in ("slices_wf.standardise", "reassemble"))


def test_pbs_and_lsf_nodes_ask_for_their_declared_memory_and_cores(tiny_model):
    """The PBS and LSF requests (no scheduler here to run them): each node's mem_gb and n_procs in the
    scheduler's own syntax, plus what the plugin file adds for a node by name."""
    from bidsharmony.cli.execution import request_resources

    for plugin, key, fmt, extra in (("PBS", "qsub_args", "-l mem={mb}mb,nodes=1:ppn={n}", "-q gpu"),
                                    ("PBSGraph", "qsub_args", "-l mem={mb}mb,nodes=1:ppn={n}", "-q gpu"),
                                    ("LSF", "bsub_args", "-M {mb} -n {n}", "-q gpu")):
        wf = init_harmonize_wf(model=tiny_model, params={"batch_size": 64}, omp_nthreads=3)
        request_resources(wf, plugin, {"harmonize": {key: extra}})
        nodes = wf._get_all_nodes()
        assert len(nodes) > 3
        for node in nodes:
            args = node.plugin_args[key]
            assert args.startswith(fmt.format(mb=max(256, round(node.mem_gb * 1024)), n=node.n_procs)), (plugin, node.name, args)
            assert args.endswith(extra) == (node.name == "harmonize")
        assert wf.get_node("harmonize").n_procs == 3
