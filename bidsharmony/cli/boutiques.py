"""The Boutiques descriptor (schema 0.5), derived from the argparse parser so the two cannot drift.

    python -m bidsharmony.cli.boutiques > boutiques.json

The committed ``boutiques.json`` is this module's output (a test compares them and walks both ways).
Boutiques' BIDS-app rules (``bosh validate --bids``) allow only the analysis levels session,
participant and group, so the ``train`` level is left out of the descriptor: train from the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys

from bidsharmony import __version__
from bidsharmony.cli.parser import build_parser
from bidsharmony.errors import EXIT_CODES

CONTAINER = f"bidsharmony/bidsharmony:{__version__}"
# Options that print and exit, or that Boutiques cannot express, are not descriptor inputs.
NOT_INPUTS = {"help", "version", "list_models"}
BIDS_LEVELS = ["participant", "group"]
# Paths the run reads (must exist) are Files; paths it creates are Strings.
EXISTING_PATHS = {"bids_filter_file", "model", "use_plugin"}
CREATED_PATHS = {"work_dir"}


def _long_flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def _value_key(dest: str) -> str:
    return f"[{dest.upper()}]"


def option_input(action: argparse.Action) -> dict:
    """The descriptor input of one optional argument."""
    inp = {
        "id": action.dest,
        "name": action.dest.replace("_", " ").capitalize(),
        "description": (action.help or "").replace("%(default)s", str(action.default)),
        "value-key": _value_key(action.dest),
        "command-line-flag": _long_flag(action),
        "optional": True,
    }
    type_name = getattr(action.type, "__name__", "")
    if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
        inp["type"] = "Flag"  # -v once: Boutiques has no counted flags
    elif action.choices:
        inp["type"] = "String"
        inp["value-choices"] = list(action.choices)
    elif type_name in ("int", "positive_int", "non_negative_int"):
        inp["type"] = "Number"
        inp["integer"] = True
        if type_name != "int":
            inp["minimum"] = 1 if type_name == "positive_int" else 0
    elif type_name == "non_negative_float":
        inp["type"] = "Number"
        inp["minimum"] = 0
    elif action.dest in EXISTING_PATHS:
        inp["type"] = "File"
    else:
        inp["type"] = "String"
    if action.nargs in ("+", "*"):
        inp["list"] = True
    if action.default not in (None, False, 0, argparse.SUPPRESS) or (action.default == 0 and inp["type"] == "Number"):
        inp["default-value"] = action.default
    return inp


def descriptor() -> dict:
    parser = build_parser()
    # In the help's order, group by group (each method adds its options to two groups).
    grouped = [a for g in parser._action_groups for a in g._group_actions]
    options = [a for a in grouped if a.option_strings and a.dest not in NOT_INPUTS]
    # BIDS-app order: the three positionals and the two labels first, then the rest.
    first = ["participant_label", "session_label"]
    options.sort(key=lambda a: (a.dest not in first, first.index(a.dest) if a.dest in first else 0))
    inputs = [
        {"id": "bids_dir", "name": "BIDS directory", "type": "File", "value-key": "[BIDS_DIR]", "optional": False,
         "description": "the root of the input BIDS dataset (never written)"},
        {"id": "output_dir_name", "name": "Output directory name", "type": "String", "value-key": "[OUTPUT_DIR]", "optional": True,
         "description": "the output folder: a BIDS-Derivatives dataset (created for the participant level)"},
        {"id": "participant_level_analysis_dir", "name": "Participant-level output", "type": "File", "value-key": "[OUTPUT_DIR]",
         "optional": True, "description": "the output folder of earlier participant runs (for the group level)"},
        {"id": "analysis_level", "name": "Analysis level", "type": "String", "value-key": "[ANALYSIS_LEVEL]", "optional": False,
         "value-choices": BIDS_LEVELS, "description": "participant: harmonize T1w runs; group: summary over all harmonized runs"},
        *[option_input(a) for a in options],
    ]
    keys = " ".join(i["value-key"] for i in inputs[4:])
    return {
        "name": "bidsharmony",
        "tool-version": __version__,
        "description": "Blind harmonization of T1w MRI with a normalizing-flow prior trained on one target scanner "
                       "(BlindHarmony), as a BIDS-App.",
        "author": "bidsharmony developers",
        "url": "https://github.com/bidsharmony/bidsharmony",
        "command-line": f"mkdir -p [OUTPUT_DIR]; bidsharmony [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL] {keys}",
        "schema-version": "0.5",
        "container-image": {"type": "docker", "image": CONTAINER},
        "inputs": inputs,
        "output-files": [{"id": "output_dir", "name": "Output directory", "path-template": "[OUTPUT_DIR]", "optional": False,
                          "description": "BIDS-Derivatives dataset with the harmonized T1w images and their sidecars"}],
        "groups": [{"id": "output_directory", "name": "Output directory", "members": ["output_dir_name", "participant_level_analysis_dir"],
                    "description": "a new output folder (participant) or the participant level's one (group)",
                    "mutually-exclusive": True, "one-is-required": True}],
        "tags": {"domain": ["neuroinformatics", "mri", "bids", "harmonization"]},
        "suggested-resources": {"cpu-cores": 2, "ram": 8, "walltime-estimate": 3600},
        "error-codes": [{"code": code, "description": text} for code, text in EXIT_CODES.items() if code],
    }


def main() -> int:
    json.dump(descriptor(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
