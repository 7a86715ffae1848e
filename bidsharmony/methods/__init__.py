"""The harmonization methods, by name: the one place that knows which methods exist.

A method is a module that provides, for the CLI, the participant workflow and the train level:

``SUMMARY``
    one line for ``--method``'s help.
``DESCRIPTION``
    the ``Description`` of each output's sidecar.
``add_arguments(harmonization, training)``
    its own options, added to the parser's two argument groups (names unique across methods).
``harmonize_params(opts, device) -> dict``
    its parameters from the options, validated; recorded in each sidecar.
``check_model(model) -> ModelInfo``
    the model folder it will use (``model`` is ``--model`` or ``None``), checked before anything is
    written, so a bad folder fails in one line and not in a node.
``init_wf(*, model, params, device, output_space, omp_nthreads, name)``
    the harmonization workflow of one T1w: ``inputnode.t1w`` in; ``outputnode.harmonized``,
    ``info`` (dict), ``trace`` and ``histograms`` (JSON files) out.
``train_defaults(gpu) -> ((steps, batch), why)``
    the train level's defaults on a GPU or a CPU, and the reason the log gives for them.
``train(opts, runs, *, device, steps, batch, run_workflow)``
    the train level: ``run_workflow(wf)`` executes a Nipype workflow in the run's work directory and
    returns its graph; the model folder is published at ``opts.output_dir``.

Adding a method is one module under ``methods/`` and one line in :data:`METHODS`. Modules are
imported on first use and import torch, ANTs and Nipype lazily, so ``--help`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

METHODS = {
    "flow": "bidsharmony.methods.blindharmony",
    "bhdiff": "bidsharmony.methods.blindharmonydiff",
    "identity": "bidsharmony.methods.identity",
}
DEFAULT = "flow"


@dataclass(frozen=True)
class ModelInfo:
    """The model a run uses: its folder (``None`` for a method without one), name and weights sha256."""

    folder: Path | None
    name: str
    sha256: str


def names() -> tuple[str, ...]:
    return tuple(METHODS)


def get(name: str):
    """The module of method ``name``; a ``KeyError`` names the methods there are."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}: choose {', '.join(METHODS)}")
    return import_module(METHODS[name])
