"""Bundled models shipped inside the package (``bidsharmony/data/models/<name>/``)."""

from __future__ import annotations

from pathlib import Path

from bidsharmony.errors import ModelError, OutputError

BUNDLED = Path(__file__).parent / "data" / "models"
DEFAULT_MODEL = "ixi-hh-fast"


def bundled_models() -> dict[str, Path]:
    if not BUNDLED.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED.iterdir()) if (p / "config.json").is_file()}


def describe_models() -> list[str]:
    """One line per bundled model: name, preset, weights sha256 (reads config.json only: no torch)."""
    import json

    lines = []
    for name, folder in bundled_models().items():
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        default = " [default]" if name == DEFAULT_MODEL else ""
        lines.append(f"{name}{default}: preset {cfg.get('preset')}, sha256 {cfg.get('weights_sha256')}, {folder}")
    return lines or [f"no bundled models in {BUNDLED}"]


def default_model() -> Path:
    models = bundled_models()
    if DEFAULT_MODEL not in models:
        raise ModelError(
            f"{BUNDLED / DEFAULT_MODEL}: no bundled default model in this installation; "
            "pass --model DIR (train one with: bidsharmony TARGET_BIDS MODEL_DIR train)"
        )
    return models[DEFAULT_MODEL]


def check_training_folder(folder: Path, overwrite: bool) -> None:
    """Before ``train`` writes anything: never into the installed package (its bundled models are
    not the user's to replace, whatever the flag), and into a folder that holds a model only with
    ``--overwrite``."""
    from bidsharmony.modelfolder import CONFIG, WEIGHTS

    real, package = Path(folder).resolve(), Path(__file__).resolve().parent
    if real == package or package in real.parents or real in package.parents:
        raise OutputError(f"{folder}: inside (or around) the installed bidsharmony package and its bundled models "
                          f"({package}); train into a folder of your own")
    if not overwrite and any((real / name).exists() for name in (CONFIG, WEIGHTS)):
        raise OutputError(f"{folder}: holds a model already; pass --overwrite to replace it, or choose another folder")
