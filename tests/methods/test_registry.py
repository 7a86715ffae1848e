"""The method registry: every method offers the whole protocol, the CLI is built from it, and a
method added as one package plus one registry line (``identity``) runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bidsharmony import methods
from bidsharmony.cli.parser import build_parser
from bidsharmony.cli.run import main
from bidsharmony.errors import EXIT_USAGE

from ..conftest import tree_digest

PROTOCOL = ("SUMMARY", "DESCRIPTION", "add_arguments", "harmonize_params", "check_model", "init_wf", "train_defaults", "train")


@pytest.mark.parametrize("name", methods.names())
def test_every_method_offers_the_whole_protocol(name):
    module = methods.get(name)
    missing = [attr for attr in PROTOCOL if not hasattr(module, attr)]
    assert not missing, f"{name}: {missing}"
    assert module.SUMMARY.startswith(f"{name}: ") and module.DESCRIPTION.startswith("T1w ")
    # The calls the CLI and the workflows make, as the registry's docstring writes them.
    import inspect

    def params(fn, kind):
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == kind]

    positional, keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    assert params(module.check_model, positional) == ["model"]
    assert params(module.harmonize_params, positional) == ["opts", "device"]
    assert params(module.add_arguments, positional) == ["harmonization", "training"]
    assert params(module.init_wf, positional) == []  # a workflow factory takes keywords only, as the nipreps' do
    assert params(module.init_wf, keyword) == ["model", "params", "device", "output_space", "omp_nthreads", "name"]
    assert params(module.train, keyword) == ["device", "steps", "batch", "run_workflow"]
    (steps, batch), why = module.train_defaults(False)
    assert isinstance(steps, int) and isinstance(batch, int) and why


def test_unknown_method_names_the_known_ones():
    with pytest.raises(KeyError, match="flow, bhdiff, identity"):
        methods.get("nope")


def test_the_parser_offers_each_registered_method_and_its_options():
    parser = build_parser()
    method = next(a for a in parser._actions if a.dest == "method")
    assert tuple(method.choices) == methods.names() and method.default == methods.DEFAULT
    dests = {a.dest for a in parser._actions}
    assert {"iterations", "standardise", "preset", "val_every"} <= dests  # flow's
    assert {"ode_steps", "patch_size", "bhdiff_preset", "train_patch"} <= dests  # bhdiff's


def test_preset_choices_mirror_the_architectures():
    """The parser lists presets without importing torch; the lists must match the real ones."""
    from bidsharmony.bhdiff.unet import PRESETS as UNET_PRESETS
    from bidsharmony.flow.model import PRESETS as FLOW_PRESETS

    actions = {a.dest: a for a in build_parser()._actions}
    assert set(actions["preset"].choices) == set(FLOW_PRESETS)
    assert set(actions["bhdiff_preset"].choices) == set(UNET_PRESETS)


def test_the_method_modules_import_nothing_heavy():
    code = ("import sys; from bidsharmony import methods; [methods.get(n) for n in methods.names()]; "
            "print(sorted(m for m in ('torch', 'ants', 'nipype') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_identity_runs_the_pipeline_and_changes_nothing(example_bids, tmp_path, capsys):
    """Registered as one line, the identity method runs through the whole participant level: each
    native output holds its source's voxels exactly, with the method's own sidecar and paragraph."""
    before = tree_digest(example_bids)
    out = tmp_path / "out"
    code = main([str(example_bids), str(out), "participant", "--method", "identity", "--nprocs", "1",
                 "-w", str(tmp_path / "work"), "--skip-bids-validation"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    outputs = sorted(out.glob("sub-*/**/anat/*_desc-harmonized_T1w.nii.gz"))
    assert len(outputs) == len(list(example_bids.glob("sub-*/**/anat/*_T1w.nii.gz")))
    for path in outputs:
        rel = path.relative_to(out).as_posix().replace("_desc-harmonized", "")
        src = nb.load(example_bids / rel)
        got = nb.load(path)
        assert np.allclose(got.affine, src.affine)
        assert np.array_equal(np.asanyarray(got.dataobj, dtype=np.float32), np.asanyarray(src.dataobj, dtype=np.float32))
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert meta["Description"] == methods.get("identity").DESCRIPTION
        assert meta["Quality"]["SimilarityToInput"] == 1.0 and meta["Parameters"] == {}
    report = (out / "sub-01.html").read_text()
    assert "without harmonization (its identity method, a baseline)" in report
    assert tree_digest(example_bids) == before


def test_identity_refuses_a_model_and_training(example_bids, tmp_path, capsys):
    code = main([str(example_bids), str(tmp_path / "out"), "participant", "--method", "identity", "--model", str(tmp_path),
                 "--skip-bids-validation"])  # fmt: skip
    assert code == EXIT_USAGE and "uses no model" in capsys.readouterr().err
    assert not Path(tmp_path / "out" / "sub-01").exists()
    code = main([str(example_bids), str(tmp_path / "model"), "train", "--method", "identity", "--skip-bids-validation",
                 "-w", str(tmp_path / "work")])  # fmt: skip
    assert code == EXIT_USAGE and "nothing to train" in capsys.readouterr().err
    assert not (tmp_path / "model" / "model.safetensors").exists()
