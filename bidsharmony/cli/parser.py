"""The BIDS-App parser (fMRIPrep/MRIQC conventions). Imports nothing heavy: --help is instant."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bidsharmony import __version__, methods
from bidsharmony.argtypes import non_negative_float, positive_int
from bidsharmony.errors import EXIT_USAGE

LEVELS = ("participant", "group", "train")
_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_MEM_SCALE = {"B": 1e-9, "K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 64 (EX_USAGE), in one line
        self.print_usage()
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def memory_gb(text: str) -> float:
    """'8GB', '500MB', '1.5T' -> gigabytes; a bare number is megabytes, as fMRIPrep reads --mem."""
    m = _MEM.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid memory {text!r}: e.g. 8GB, 500MB or 8000 (MB)")
    return float(m.group(1)) * _MEM_SCALE[(m.group(2) or "M")[0].upper()]


def _model_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text) or len(text) > 100:
        raise argparse.ArgumentTypeError(f"{text!r}: a model name is a simple label (letters, digits, '-', '_', '.'; "
                                         "starting with a letter or digit; 100 characters at most)")
    return text


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"invalid device {text!r}: choose auto, cpu, cuda or cuda:N")


def _models_text() -> str:
    from bidsharmony.models import describe_models

    return "\n".join(describe_models())


def _version_text() -> str:
    return f"bidsharmony {__version__}\n" + "\n".join(f"model {line}" for line in _models_text().splitlines())


class _PrintAndExit(argparse.Action):
    """Like action='version', but unwrapped (sha256 lines must stay whole) and computed lazily."""

    def __init__(self, option_strings, dest, text, **kwargs):
        self.text = text
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.text())  # stdout, as argparse's version action
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bidsharmony",
        description="Blind harmonization of T1w MRI with a normalizing-flow prior trained on one "
        "target scanner (BlindHarmony), as a BIDS-App.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the root of the input BIDS dataset (never written)")
    p.add_argument("output_dir", type=Path, help="the output folder: a BIDS-Derivatives dataset (participant, group) or a model folder (train)")
    p.add_argument("analysis_level", help=f"processing stage: {', '.join(LEVELS)}")
    p.add_argument("--version", action=_PrintAndExit, text=_version_text, help="show the version and the bundled models, and exit")
    p.add_argument("--list-models", action=_PrintAndExit, text=_models_text, help="list the bundled models with their sha256 and exit")

    g = p.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", action="extend", metavar="LABEL", help="participants to process (with or without 'sub-'); default: all")
    g.add_argument("--session-label", nargs="+", action="extend", metavar="LABEL", help="sessions to process (with or without 'ses-'); default: all")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE", help="JSON of pybids filters (fMRIPrep format); its 't1w' query narrows the T1w selection")
    g.add_argument("--bids-database-dir", type=Path, metavar="DIR", help="keep pybids' index of BIDS_DIR here and reuse it on later runs (large datasets); delete it after changing the dataset")
    g.add_argument("--skip-bids-validation", action="store_true", help="skip the BIDS validator and the checks of dataset_description.json")

    g = p.add_argument_group("harmonization")
    g.add_argument("--method", choices=methods.names(), default=methods.DEFAULT,
                   help="; ".join(methods.get(name).SUMMARY for name in methods.names()))
    g.add_argument("--model", type=Path, metavar="DIR", help="model folder (model.safetensors + config.json); default: the bundled model")
    g.add_argument("--output-space", choices=("native", "harmonization"), default="native", help="native: the input's grid, affine and header; harmonization: the model's 1.2 mm RAS grid")
    harmonization = g

    g = p.add_argument_group("training (analysis level 'train')")
    g.add_argument("--steps", type=positive_int, default=None, help="optimisation steps (default: 10000 on a GPU, 2000 on a CPU; bhdiff: 20000)")
    g.add_argument("--train-batch-size", type=positive_int, default=None, help="slices per training step (default: 256 on a GPU, 32 on a CPU; bhdiff: 2 patches)")
    g.add_argument("--model-name", type=_model_name, default=None, metavar="NAME", help="the name recorded in the model's config.json (letters, digits, '-', '_', '.'); default: the OUTPUT_DIR folder's name")
    g.add_argument("--learning-rate", type=non_negative_float, default=5e-4, help="Adam learning rate (cosine-annealed to 0)")
    g.add_argument("--checkpoint-every", type=positive_int, default=250, help="save the training state every N steps (resume point)")
    g.add_argument("--amp", action="store_true", help="bf16 mixed precision in the coupling conditioners (for GPUs; the spline arithmetic stays float32)")
    for name in methods.names():  # each method's own options, in its groups
        methods.get(name).add_arguments(harmonization, g)
    g.add_argument("--overwrite", action="store_true", help="replace the model that OUTPUT_DIR holds (refused without it; the bundled models never)")

    g = p.add_argument_group("performance")
    g.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--nprocs", "--nthreads", "--n-cpus", type=positive_int, metavar="N", help="maximum processes/threads in total (default: all CPUs)")
    g.add_argument("--omp-nthreads", type=positive_int, metavar="N", help="threads per process (torch, ITK); default: min(8, nprocs)")
    g.add_argument("--mem", type=memory_gb, metavar="SIZE", help="memory the run may use, with a unit (8GB, 500MB) or in MB (8000)")
    g.add_argument("--use-plugin", type=Path, metavar="FILE", help="Nipype plugin YAML (plugin: SLURM, plugin_args: {...})")

    g = p.add_argument_group("workflow")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR", help="Nipype work directory; a rerun reuses finished nodes (default: OUTPUT_DIR/.bidsharmony-work; train: .NAME-work beside the model folder)")
    g.add_argument("--clean-workdir", action="store_true", help="recompute the selected runs from scratch: remove their nodes from the work directory first (other runs' nodes are kept)")
    g.add_argument("--reports-only", action="store_true", help="participant level: only rewrite the HTML reports from the outputs already in OUTPUT_DIR")
    g.add_argument("--random-seed", type=int, default=0, help="fixes every random choice (dequantisation noise, training)")
    g.add_argument("--stop-on-first-crash", action="store_true", help="stop at the first failing node")
    g.add_argument("--resource-monitor", action="store_true", help="record memory and CPU of each node (Nipype)")
    g.add_argument("--write-graph", action="store_true", help="write the workflow graph (SVG/PNG via graphviz)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more output; -vv for debug; tracebacks on errors")
    return p
