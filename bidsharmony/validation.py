"""The BIDS validator on the input dataset, as fMRIPrep runs it before any work.

``bids-validator-deno`` (a dependency of bidsharmony) checks BIDS_DIR against the BIDS schema.
Errors stop the run with exit 16 and one line that names the first; warnings are only logged.
The whole report goes to ``OUT_DIR/logs/bids-validation-<time>-<pid>.log``. Where the validator
cannot run (not installed, no runtime for this platform), bidsharmony says so in a warning and
goes on with its own checks of ``dataset_description.json``; ``--skip-bids-validation`` skips both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sysconfig
import time
from collections import Counter
from pathlib import Path

from bidsharmony.errors import BIDSInvalidError

LOG = logging.getLogger("bidsharmony")
VALIDATOR = "bids-validator-deno"
EXIT_INVALID = 16  # the validator's own code for "errors found"


def find_validator() -> str | None:
    """The validator's executable: beside this Python's scripts first (a virtual environment that
    is not activated), then on PATH."""
    path = os.pathsep.join(p for p in (sysconfig.get_path("scripts"), os.environ.get("PATH", "")) if p)
    return shutil.which(VALIDATOR, path=path)


class ValidatorUnavailable(Exception):
    """The validator is missing or could not produce a report."""


def run_validator(bids_dir: Path, timeout: float | None = None) -> dict:
    """The validator's JSON report on bids_dir; raises ValidatorUnavailable where it cannot run."""
    exe = find_validator()
    if exe is None:
        raise ValidatorUnavailable(f"{VALIDATOR} not found (pip install {VALIDATOR})")
    cmd = [exe, "--format", "json", "--no-color", str(bids_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValidatorUnavailable(f"{VALIDATOR} could not run ({e})") from None
    try:
        report = json.loads(proc.stdout)
        issues = report["issues"]["issues"]
    except (json.JSONDecodeError, KeyError, TypeError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise ValidatorUnavailable(f"{VALIDATOR} exited {proc.returncode} without a report ({tail[0][:200]})") from None
    if proc.returncode not in (0, EXIT_INVALID):
        raise ValidatorUnavailable(f"{VALIDATOR} exited {proc.returncode}")
    if proc.returncode == EXIT_INVALID and not any(i.get("severity") == "error" for i in issues):
        raise ValidatorUnavailable(f"{VALIDATOR} exited {proc.returncode} but reported no error")
    report["command"] = cmd
    return report


def _describe(issue: dict) -> str:
    where = issue.get("location") or "(dataset)"
    sub = f" [{issue['subCode']}]" if issue.get("subCode") else ""
    return f"{issue.get('code', '?')}{sub} at {where}"


def write_report(report: dict, path: Path) -> None:
    """The validator's findings as text: errors first, one line per issue, then each code's meaning."""
    issues = report["issues"]["issues"]
    order = {"error": 0, "warning": 1}
    lines = [f"command: {' '.join(report['command'])}"]
    counts = Counter(i.get("severity", "?") for i in issues)
    summary = ", ".join(f"{n} {sev}(s)" for sev, n in sorted(counts.items(), key=lambda x: order.get(x[0], 2)))
    lines.append(f"summary: {summary or 'no issues'}")
    lines.append("")
    for issue in sorted(issues, key=lambda i: (order.get(i.get("severity"), 2), i.get("code", ""), i.get("location") or "")):
        message = " ".join(str(issue.get("issueMessage") or "").split())
        lines.append(f"{issue.get('severity', '?').upper():8} {_describe(issue)}" + (f": {message}" if message else ""))
    codes = report["issues"].get("codeMessages") or {}
    if codes:
        lines += ["", "what the codes mean:"]
        lines += [f"  {code}: {' '.join(str(text).split())}" for code, text in sorted(codes.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# A validator that hangs (a stalled mount, a huge dataset) must not hang the BIDS-App: past this it
# counts as not run, with a warning. Tens of thousands of files validate in minutes.
VALIDATOR_TIMEOUT_S = 1800


def validate_dataset(bids_dir: Path, log_dir: Path) -> None:
    """Run the BIDS validator on bids_dir: BIDSInvalidError (exit 16) on errors, warnings logged."""
    try:
        report = run_validator(bids_dir, timeout=VALIDATOR_TIMEOUT_S)
    except ValidatorUnavailable as e:
        LOG.warning("%s: BIDS validator not run: %s; only dataset_description.json was checked "
                    "(--skip-bids-validation silences this)", bids_dir, e)  # fmt: skip
        return
    log = Path(log_dir) / f"bids-validation-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    write_report(report, log)
    issues = report["issues"]["issues"]
    errors = [i for i in issues if i.get("severity") == "error"]
    warnings = Counter(i.get("code", "?") for i in issues if i.get("severity") == "warning")
    if errors:
        n = len(errors)
        raise BIDSInvalidError(f"{bids_dir}: BIDS validation failed: {n} error{'s' if n != 1 else ''} "
                               f"(first: {_describe(errors[0])}); full report in {log}")  # fmt: skip
    LOG.info("%s: BIDS validation passed with %d warning(s)%s; full report in %s", bids_dir, sum(warnings.values()),
             f" ({', '.join(sorted(warnings))})" if warnings else "", log)  # fmt: skip


# What bidsharmony writes into OUT_DIR that BIDS-Derivatives does not define: reports, their
# figures (named BIDS-style, sub-X/figures/sub-X_..._desc-<what>_T1w.png, as fMRIPrep names its
# own), group summaries and logs. As in fMRIPrep's outputs, a .bidsignore keeps the validator from
# judging them as BIDS files; the images and sidecars themselves stay BIDS. Folder names go without
# a trailing slash: with one, bids-validator-deno 3 still reports the folder itself as NOT_INCLUDED.
BIDSIGNORE = ("*.html", "figures", "logs", "group.tsv", ".bidsharmony-work")


def write_bidsignore(out_dir: Path, work_dir: Path | None = None) -> Path:
    """OUT_DIR/.bidsignore with bidsharmony's non-BIDS outputs, keeping any line already there
    (a work directory inside OUT_DIR is listed too)."""
    out_dir = Path(out_dir)
    path = out_dir / ".bidsignore"
    wanted = list(BIDSIGNORE)
    if work_dir is not None:
        try:
            rel = Path(work_dir).resolve().relative_to(out_dir.resolve())
        except ValueError:
            rel = None
        if rel is not None and rel.parts:
            wanted.append(rel.as_posix())
    try:
        old = path.read_text().splitlines()
    except FileNotFoundError:
        old = []
    missing = [line for line in wanted if line not in old]
    if missing:
        from bidsharmony.outputs import atomic_write_text

        atomic_write_text(path, "\n".join([*old, *missing]) + "\n", root=out_dir)
    return path
