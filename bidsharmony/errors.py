"""User-facing errors and the exit codes they map to (documented in README, "Exit codes")."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BIDS_INVALID = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_FILES = 18
EXIT_USAGE = 64
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73
EXIT_BUSY = 75

# The documented meaning of each exit code (README, Boutiques descriptor).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "failure while running (a node crashed, no GPU for --device cuda, ...)",
    EXIT_BIDS_INVALID: "BIDS validation failed (the BIDS validator found errors, or dataset_description.json is missing or invalid)",
    EXIT_UNKNOWN_LEVEL: "unknown analysis level",
    EXIT_NO_FILES: "the selection (labels, sessions, filters) matched no T1w image",
    EXIT_USAGE: "usage error (bad option or value, invalid label such as ../x, invalid filter file)",
    EXIT_NO_INPUT: "missing or unreadable input (BIDS_DIR, participant, NIfTI, model folder)",
    EXIT_CANT_CREATE: "cannot create output (OUT_DIR inside or around BIDS_DIR, another dataset, a link leading outside OUT_DIR, not writable)",
    EXIT_BUSY: "a participant is being processed by another run into the same OUT_DIR (try again when it is done)",
}


class BidsHarmonyError(Exception):
    """An error the user can act on: printed as one line, mapped to an exit code."""

    exit_code = EXIT_FAILURE


class UsageError(BidsHarmonyError):
    exit_code = EXIT_USAGE


class UnknownLevelError(BidsHarmonyError):
    exit_code = EXIT_UNKNOWN_LEVEL


class BIDSInvalidError(BidsHarmonyError):
    exit_code = EXIT_BIDS_INVALID


class NoFilesError(BidsHarmonyError):
    exit_code = EXIT_NO_FILES


class MissingInputError(BidsHarmonyError):
    exit_code = EXIT_NO_INPUT


class OutputError(BidsHarmonyError):
    exit_code = EXIT_CANT_CREATE


class BusyError(BidsHarmonyError):
    """Another live run holds the participant's lock in OUT_DIR."""

    exit_code = EXIT_BUSY


class ImageError(MissingInputError):
    """An input image that cannot be read or used (corrupt, wrong dimensionality, no finite data)."""


class ModelError(MissingInputError):
    """A model folder that is missing, corrupt, unsafe or does not match its config."""
