"""Everything BIDS: dataset checks, the T1w query (pybids), derivative names and metadata.

One place for the naming of outputs, so the CLI, the workflows and the tests agree.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

from bidsharmony import __version__
from bidsharmony.errors import (
    BIDSInvalidError,
    MissingInputError,
    NoFilesError,
    OutputError,
    UsageError,
)

LOG = logging.getLogger("bidsharmony")
CODE_URL = "https://github.com/bidsharmony/bidsharmony"
BIDS_VERSION = "1.10.0"
# Every BIDS entity, in the specification's order (pybids name -> filename key). An input's
# entities are all carried into its derivative's name, so two inputs never map to one output.
ENTITY_ORDER = {
    "subject": "sub", "session": "ses", "sample": "sample", "task": "task", "tracksys": "tracksys",
    "acquisition": "acq", "nucleus": "nuc", "volume": "voi", "ceagent": "ce", "tracer": "trc", "stain": "stain",
    "reconstruction": "rec", "direction": "dir", "run": "run", "modality": "mod", "echo": "echo", "flip": "flip",
    "inversion": "inv", "mtransfer": "mt", "part": "part", "processing": "proc", "hemisphere": "hemi",
    "space": "space", "split": "split", "recording": "recording", "chunk": "chunk", "segmentation": "seg",
    "resolution": "res", "density": "den", "label": "label", "description": "desc",
}  # fmt: skip
_LONG = {short: long for long, short in ENTITY_ORDER.items()}
_SET_BY_US = ("resolution", "description")  # the derivative's own res- and desc-
_LABEL = re.compile(r"^[a-zA-Z0-9]+$")
RAW_DATASET = "raw"  # name of the input dataset in DatasetLinks and BIDS URIs


def clean_label(label: str, prefix: str) -> str:
    """'sub-01' or '01' -> '01'; refuses anything that is not alphanumeric (paths, globs)."""
    value = label[len(prefix) + 1 :] if label.startswith(prefix + "-") else label
    if not _LABEL.match(value):
        raise UsageError(f"invalid {prefix} label {label!r}: BIDS labels are letters and digits only")
    return value


def check_dataset(bids_dir: Path, skip_validation: bool) -> None:
    """Fail early with the right exit code on a missing or invalid dataset root."""
    if not bids_dir.exists():
        raise MissingInputError(f"{bids_dir}: BIDS directory not found")
    if not bids_dir.is_dir():
        raise MissingInputError(f"{bids_dir}: not a directory")
    desc = bids_dir / "dataset_description.json"
    if skip_validation:
        if not desc.is_file():
            LOG.warning("%s: missing; continuing because of --skip-bids-validation", desc)
        return
    if not desc.is_file():
        raise BIDSInvalidError(f"{desc}: missing (every BIDS dataset has one; --skip-bids-validation to go on)")
    try:
        content = json.loads(desc.read_text() or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BIDSInvalidError(f"{desc}: not valid JSON ({e})") from None
    if not isinstance(content, dict) or not content.get("Name") or not content.get("BIDSVersion"):
        raise BIDSInvalidError(f"{desc}: must be a JSON object with 'Name' and 'BIDSVersion'")


def check_output_dir(bids_dir: Path, out_dir: Path) -> None:
    """Refuse an OUT_DIR that would write into another dataset (rules: docs/robustness.md,
    "Where bidsharmony writes"), then create it and prove it writable."""
    bids_dir, out_dir = bids_dir.resolve(), out_dir.resolve()
    if out_dir == bids_dir or bids_dir in out_dir.parents:
        # The input dataset is never written: not even a derivatives/ folder inside it.
        raise OutputError(f"{out_dir}: output directory is inside the BIDS directory {bids_dir}; choose a folder outside it")
    if out_dir in bids_dir.parents:
        # Cleanup and outputs walk OUT_DIR: the input dataset must not be below it.
        raise OutputError(f"{out_dir}: output directory contains the BIDS directory {bids_dir}; choose a folder beside it")
    if out_dir.is_dir():
        check_not_foreign(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create output directory ({e.strerror})") from None
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    try:  # a real write, not os.access: a read-only mount refuses even root
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".bidsharmony-write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"{out_dir}: output directory is not writable ({e.strerror})") from None


def _generated_by(desc: dict) -> list[str]:
    gen = desc.get("GeneratedBy") or desc.get("PipelineDescription") or []
    gen = [gen] if isinstance(gen, dict) else gen
    return [str(g.get("Name", "")) for g in gen if isinstance(g, dict)]


def _read_description(path: Path):
    try:
        desc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable ({type(e).__name__})"
    return (desc, None) if isinstance(desc, dict) else (None, "not a JSON object")


def check_not_foreign(out_dir: Path) -> None:
    """OUT_DIR may be new, empty, or bidsharmony's own derivatives; never another dataset.

    A raw dataset (``DatasetType`` raw or absent) or another program's derivatives is refused —
    swapped arguments or a link to raw data would otherwise replace its description and write
    outputs and a work directory into it. A folder with ``sub-*`` entries and no description is
    refused too: it is not something bidsharmony made (it writes the description first).
    """
    desc_path = out_dir / "dataset_description.json"
    if desc_path.is_file():
        desc, problem = _read_description(desc_path)
        if desc is None:
            raise OutputError(f"{desc_path}: {problem}; OUT_DIR must be empty or a bidsharmony output folder")
        kind = desc.get("DatasetType", "raw")
        if kind != "derivative":
            raise OutputError(f"{out_dir}: is a {kind} BIDS dataset ({desc.get('Name', 'unnamed')!r}), not an output folder; "
                              "choose an empty folder (BIDS_DIR and OUT_DIR swapped?)")
        names = _generated_by(desc)
        if "bidsharmony" not in names:
            raise OutputError(f"{out_dir}: is a derivatives dataset written by {', '.join(names) or 'an unknown program'}, "
                              "not by bidsharmony; choose an empty folder")
    elif any(out_dir.glob("sub-*")):
        raise OutputError(f"{out_dir}: holds sub-* entries but no dataset_description.json, so it is not a bidsharmony "
                          "output folder; choose an empty folder")


def check_input_kind(bids_dir: Path) -> None:
    """BIDS_DIR should be raw data: bidsharmony's own outputs as input mean swapped arguments (an
    error); another program's derivatives may be meant (a warning)."""
    desc, _ = _read_description(bids_dir / "dataset_description.json")
    if not desc or desc.get("DatasetType") != "derivative":
        return
    names = _generated_by(desc)
    if "bidsharmony" in names:
        raise UsageError(f"{bids_dir}: is a bidsharmony output folder, not raw data; BIDS_DIR and OUT_DIR swapped?")
    LOG.warning("%s: is a derivatives dataset (%s), not raw data; harmonizing its T1w images as given",
                bids_dir, ", ".join(names) or "unknown program")


def check_work_dir(bids_dir: Path, work_dir: Path) -> None:
    """The work directory (tens of MB per run) is never inside the input dataset."""
    bids_real, work_real = bids_dir.resolve(), work_dir.resolve()
    if work_real == bids_real or bids_real in work_real.parents:
        raise OutputError(f"{work_dir}: work directory is inside the BIDS directory {bids_real}; choose a folder outside it")


def load_filters(path: Path | None) -> dict:
    """fMRIPrep's --bids-filter-file format; only the 't1w' query applies here."""
    if path is None:
        return {}
    if not path.is_file():
        raise MissingInputError(f"{path}: filter file not found")
    try:
        filters = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: filter file is not valid JSON ({e})") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(f"{path}: filter file must map query names (e.g. 't1w') to entity filters")
    unknown = set(filters) - {"t1w"}
    if unknown:
        LOG.warning("%s: ignoring queries %s (bidsharmony reads only 't1w')", path, sorted(unknown))
    return filters.get("t1w", {})


# Sidecar fields that say which scanner (and site) a run comes from: the group level groups by them.
SCANNER_FIELDS = ("Manufacturer", "ManufacturersModelName", "MagneticFieldStrength", "InstitutionName", "StationName")


def open_layout(bids_dir: Path, database_dir: Path | None = None):
    """pybids' index of BIDS_DIR; with ``database_dir`` (fMRIPrep's --bids-database-dir) it is
    saved there on first use and reused afterwards, which saves minutes on large datasets. pybids
    silently reuses a database made for another root: that is refused here."""
    from bids import BIDSLayout

    kwargs = {}
    if database_dir is not None:
        bids_real, db_real = Path(bids_dir).resolve(), Path(database_dir).resolve()
        if db_real == bids_real or bids_real in db_real.parents:
            raise OutputError(f"{database_dir}: database directory is inside the BIDS directory {bids_real}; choose a folder outside it")
        if db_real.exists() and not db_real.is_dir():
            raise OutputError(f"{database_dir}: exists and is not a directory")
        kwargs["database_path"] = str(database_dir)
    try:
        layout = BIDSLayout(str(bids_dir), validate=False, **kwargs)
    except Exception as e:  # pybids raises several types for unreadable roots
        raise BIDSInvalidError(f"{bids_dir}: pybids cannot index the dataset ({e})") from None
    if database_dir is not None and Path(layout.root).resolve() != Path(bids_dir).resolve():
        raise UsageError(f"{database_dir}: indexes {layout.root}, not {bids_dir}; give another --bids-database-dir")
    return layout


def collect_t1w(bids_dir: Path, participants=None, sessions=None, filters=None, filter_file=None, database_dir=None) -> list[dict]:
    """T1w runs as dicts: {'path', 'entities', 'relpath', 'scanner'}, sorted by path.
    ``filter_file``: where ``filters`` came from, named in their errors; ``database_dir``: a
    reusable pybids index (``open_layout``)."""
    layout = open_layout(bids_dir, database_dir)
    subjects = set(layout.get_subjects())
    if participants:
        missing = sorted(set(participants) - subjects)
        if missing:
            raise MissingInputError(f"{bids_dir}: participant(s) not found: {', '.join('sub-' + m for m in missing)}")
    source = filter_file or "BIDS filter"
    unknown = sorted(set(filters or {}) - set(layout.get_entities()))
    if unknown:  # pybids' own error names neither the file nor the entities one may use
        raise UsageError(f"{source}: unknown entity {', '.join(map(repr, unknown))} in the 't1w' filter; "
                         f"entities of {bids_dir}: {', '.join(sorted(layout.get_entities()))}")
    query = {"datatype": "anat", "extension": [".nii", ".nii.gz"]}
    query.update(filters or {})
    query.update(suffix="T1w", return_type="object")
    if participants:
        query["subject"] = list(participants)
    if sessions:
        query["session"] = list(sessions)
    try:
        files = layout.get(**query)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{source}: invalid 't1w' filter {filters} ({e})") from None
    runs = []
    for f in sorted(files, key=lambda f: f.path):
        ents = filename_entities(f.filename, f.entities)
        meta = layout.get_metadata(f.path)  # with BIDS inheritance
        scanner = {k: meta[k] for k in SCANNER_FIELDS if k in meta}
        runs.append({"path": f.path, "entities": ents, "relpath": f.relpath, "scanner": scanner})
    _refuse_shared_outputs(runs)
    if not runs:
        what = []
        if participants:
            what.append("participants " + ", ".join(participants))
        if sessions:
            what.append("sessions " + ", ".join(sessions))
        if filters:
            what.append(f"filters {filters}")
        raise NoFilesError(f"{bids_dir}: no T1w images found" + (" for " + "; ".join(what) if what else ""))
    return runs


def _refuse_shared_outputs(runs) -> None:
    """Two inputs that would be written to one output (they differ only in what the output name
    replaces, ``res-``/``desc-``, or in .nii versus .nii.gz) are refused before any work: one
    would silently overwrite the other."""
    seen = {}
    for run in runs:
        stem = run_stem(run["entities"])
        if stem in seen:
            raise UsageError(f"{run['path']}: would be written to the same output as {seen[stem]} ({stem}); "
                             "select one of them with --bids-filter-file")
        seen[stem] = run["path"]


def filename_entities(filename: str, known: dict | None = None) -> dict:
    """Every entity in a BIDS filename, as {pybids name: value} in filename order; values that
    pybids parsed (``known``: typed, e.g. run as an int) are preferred over the raw text."""
    known = known or {}
    ents = {}
    for part in Path(filename).name.split(".")[0].split("_")[:-1]:  # the last part is the suffix
        key, sep, value = part.partition("-")
        if sep and value:
            name = _LONG.get(key, key)
            ents[name] = known.get(name, value)
    return ents


def run_stem(entities: dict) -> str:
    """The input's entities as a filename stem (sub-01_ses-1_run-2): one name per run."""
    def order(name):
        keys = list(ENTITY_ORDER)
        return keys.index(name) if name in ENTITY_ORDER else len(keys)

    names = sorted((k for k in entities if k not in _SET_BY_US and entities[k] not in (None, "")), key=order)
    return "_".join(f"{ENTITY_ORDER.get(k, k)}-{entities[k]}" for k in names)


def stem_of(filename: str) -> str:
    """A run's stem (sub-01_ses-1_run-2) from any of its files' names (an output, its sidecar, a
    figure): ``run_stem`` of the name's entities, so without the output's own res- and desc-."""
    return run_stem(filename_entities(Path(filename).name))


def derivative_name(entities: dict, desc: str = "harmonized", suffix: str = "T1w", extension: str = ".nii.gz", res: str | None = None) -> str:
    parts = [run_stem(entities)]
    if res:
        parts.append(f"res-{res}")
    parts.append(f"desc-{desc}")
    return "_".join(parts) + f"_{suffix}{extension}"


def derivative_path(out_dir: Path, entities: dict, **kwargs) -> Path:
    folder = Path(out_dir) / f"sub-{entities['subject']}"
    if entities.get("session"):
        folder = folder / f"ses-{entities['session']}"
    return folder / "anat" / derivative_name(entities, **kwargs)


def check_output_paths(out_dir, runs) -> None:
    """Before any work: every place a participant run will write (its derivative folder, figures,
    report, the dataset description) resolves inside OUT_DIR. Refuses in one line what the
    writers would refuse after minutes of work."""
    from bidsharmony.outputs import ensure_inside

    out_dir = Path(out_dir)
    places = [out_dir / "dataset_description.json"]
    for run in runs:
        subject = out_dir / f"sub-{run['entities']['subject']}"
        places += [derivative_path(out_dir, run["entities"]), subject / "figures", subject.with_name(subject.name + ".html")]
    for place in places:
        ensure_inside(place, out_dir)


def bids_uri(relpath: str) -> str:
    return f"bids:{RAW_DATASET}:{Path(relpath).as_posix()}"


def write_dataset_description(out_dir: Path, bids_dir: Path) -> None:
    """Create or update OUT_DIR/dataset_description.json (BIDS-Derivatives), atomically."""
    from bidsharmony.outputs import atomic_write_text

    path = Path(out_dir) / "dataset_description.json"
    desc = {
        "Name": "bidsharmony: flow-prior harmonized T1w",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bidsharmony", "Version": __version__, "CodeURL": CODE_URL}],
        "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}],
        "DatasetLinks": {RAW_DATASET: Path(bids_dir).resolve().as_uri()},
        "License": "Derived data carry the licence of the input dataset and of the model's training data.",
    }
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("DatasetLinks", {}).get(RAW_DATASET) not in (None, desc["DatasetLinks"][RAW_DATASET]):
                LOG.warning("%s: output directory previously received results from another dataset", path)
        except (OSError, json.JSONDecodeError):
            pass
    atomic_write_text(path, json.dumps(desc, indent=2) + "\n", root=out_dir)
