"""The Boutiques descriptor: current, in step with the parser both ways, valid, and launchable."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bidsharmony.cli.boutiques import BIDS_LEVELS, NOT_INPUTS, descriptor
from bidsharmony.cli.parser import LEVELS, build_parser

REPO = Path(__file__).resolve().parents[1]
DESCRIPTOR = REPO / "boutiques.json"
POSITIONAL_KEYS = {"bids_dir": "[BIDS_DIR]", "output_dir": "[OUTPUT_DIR]", "analysis_level": "[ANALYSIS_LEVEL]"}


def test_the_committed_descriptor_is_the_generated_one():
    assert json.loads(DESCRIPTOR.read_text()) == json.loads(json.dumps(descriptor())), (
        "boutiques.json is stale: python -m bidsharmony.cli.boutiques > boutiques.json")


def test_descriptor_and_parser_have_the_same_options_both_ways():
    desc = json.loads(DESCRIPTOR.read_text())
    parser = build_parser()
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_INPUTS}
    by_flag = {i["command-line-flag"]: i for i in desc["inputs"] if "command-line-flag" in i}
    # parser -> descriptor: every option, with its flag, default and choices
    for dest, action in options.items():
        matches = [by_flag[f] for f in action.option_strings if f in by_flag]
        assert len(matches) == 1, f"--{dest} missing from boutiques.json"
        inp = matches[0]
        assert inp["id"] == dest and inp["value-key"] in desc["command-line"]
        if action.choices:
            assert inp["value-choices"] == list(action.choices)
        if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
            assert inp["type"] == "Flag"
        elif action.default is not None:
            assert inp["default-value"] == action.default
        assert inp.get("list", False) == (action.nargs in ("+", "*"))
    # descriptor -> parser: every input is an option or a positional of the parser
    positionals = {a.dest for a in parser._actions if not a.option_strings}
    assert positionals == set(POSITIONAL_KEYS)
    for inp in desc["inputs"]:
        if "command-line-flag" in inp:
            assert parser._option_string_actions[inp["command-line-flag"]].dest == inp["id"]
        else:
            assert inp["value-key"] in POSITIONAL_KEYS.values(), inp["id"]
    levels = next(i for i in desc["inputs"] if i["id"] == "analysis_level")["value-choices"]
    assert levels == BIDS_LEVELS and set(levels) <= set(LEVELS)


def test_bosh_validates_the_descriptor_as_a_bids_app():
    pytest.importorskip("boutiques")
    from boutiques import bosh

    bosh(["validate", "--bids", str(DESCRIPTOR)])  # raises on an invalid descriptor
    broken = json.loads(DESCRIPTOR.read_text())
    broken["command-line"] = broken["command-line"].replace("[ANALYSIS_LEVEL] ", "")
    with pytest.raises(Exception, match="command-line"):
        bosh(["validate", "--bids", json.dumps(broken)])


@pytest.mark.slow
def test_bosh_exec_launch_runs_bidsharmony(example_bids, tiny_model, tmp_path):
    bosh = shutil.which("bosh") or pytest.skip("boutiques' bosh is not installed")
    out, work = tmp_path / "out", tmp_path / "work"
    invocation = {"bids_dir": str(example_bids), "output_dir_name": str(out), "analysis_level": "participant",
                  "participant_label": ["01"], "session_label": ["1"], "model": str(tiny_model), "nprocs": 1,
                  "work_dir": str(work), "device": "cpu", "iterations": 2}
    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps(invocation))
    env_bin = str(Path(sys.executable).parent)  # the bidsharmony of this environment
    proc = subprocess.run([bosh, "exec", "launch", "--no-container", str(DESCRIPTOR), str(inv)], capture_output=True, text=True,
                          env={"PATH": f"{env_bin}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-harmonized_T1w.nii.gz"
    assert result.is_file() and not (out / "sub-02").exists()
    side = json.loads(result.with_name(result.name.replace(".nii.gz", ".json")).read_text())
    assert side["Parameters"]["iterations"] == 2
