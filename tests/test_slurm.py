"""Scale-out through Nipype plugins: per-node scheduler requests, and a real one-node SLURM cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import RUN_OPTIONS

START_CLUSTER = Path(__file__).parent / "slurm" / "start-cluster.sh"


def _workflow(example_bids, tiny_model, tmp_path):
    from bidsharmony import bids
    from bidsharmony.workflows.base import init_bidsharmony_wf

    runs = bids.collect_t1w(example_bids, [], [], {})
    params = {"iterations": 1, "alpha": 1e-3, "beta_fidelity": 1e3, "beta_gradient": 1e-3, "similarity": "cosine",
              "start": "source", "solver": "alternating", "latent_lr": 0.05, "batch_size": 8, "seed": 0}
    return init_bidsharmony_wf(runs=runs, out_dir=tmp_path / "out", model=str(tiny_model), params=params, device="cpu", omp_nthreads=2)


def test_every_node_asks_the_scheduler_for_its_declared_memory_and_cores(example_bids, tiny_model, tmp_path):
    from bidsharmony.cli.execution import request_resources

    wf = _workflow(example_bids, tiny_model, tmp_path)
    request_resources(wf, "SLURM", {"harmonize": {"sbatch_args": "--partition=gpu --gres=gpu:1"}})
    nodes = wf._get_all_nodes()
    assert nodes
    for node in nodes:
        args = node.plugin_args["sbatch_args"]
        assert f"--mem={max(256, round(node.mem_gb * 1024))}M" in args and f"--cpus-per-task={node.n_procs}" in args
        assert ("--gres=gpu:1" in args) == (node.name == "harmonize")
    harmonize = [n for n in nodes if n.name == "harmonize"]
    assert harmonize and all(n.n_procs == 2 for n in harmonize)


def test_a_plugin_file_with_bad_node_arguments_is_a_usage_error(example_bids, tmp_path):
    from bidsharmony.cli.run import main

    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: SLURM\nnode_plugin_args: [harmonize]\n")
    assert main([str(example_bids), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)]) == 64


def _cluster_or_skip() -> None:
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("starting a test SLURM cluster needs root")
    proc = subprocess.run(["bash", str(START_CLUSTER)], capture_output=True, text=True)
    if proc.returncode:
        pytest.fail(f"could not start the one-node SLURM cluster: {proc.stderr[-2000:]}")


@pytest.mark.slow
def test_two_subjects_through_slurm_give_the_multiproc_outputs(participant_run, tiny_model, tmp_path):
    import nibabel as nb

    _cluster_or_skip()
    plugin = tmp_path / "slurm.yml"
    plugin.write_text("plugin: SLURM\nplugin_args:\n  sbatch_args: --partition=debug\n  max_jobs: 8\n"
                      "node_plugin_args:\n  harmonize:\n    sbatch_args: --comment=harmonize_gpu_partition\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bidsharmony", str(participant_run["bids"]), str(out), "participant",
           "--model", str(tiny_model), "--use-plugin", str(plugin), "--omp-nthreads", "1", "--nprocs", "2",
           "-w", str(tmp_path / "work"), "--device", "cpu", "--participant-label", "01", "02", *RUN_OPTIONS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Nipype writes one batch script per node it submits, and SLURM one log per job, into batch/.
    assert list((tmp_path / "work").rglob("batchscript_*harmonize*.sh")), "the harmonize nodes were not submitted to SLURM"
    assert list((tmp_path / "work").rglob("slurm-*.out")), "no SLURM job wrote its log"
    reference = sorted(participant_run["out"].rglob("*_desc-harmonized_T1w.nii.gz"))
    assert len(reference) == 4
    for ref in reference:
        got = out / ref.relative_to(participant_run["out"])
        a, b = nb.load(str(ref)), nb.load(str(got))
        assert np.allclose(a.affine, b.affine)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
