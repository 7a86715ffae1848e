"""The T1w runs that the options select (labels, sessions, filters, a pybids database), and their
images checked before any work."""

from __future__ import annotations


def select_runs(opts):
    from bidsharmony import bids

    participants = [bids.clean_label(x, "sub") for x in opts.participant_label or []]
    sessions = [bids.clean_label(x, "ses") for x in opts.session_label or []]
    filters = bids.load_filters(opts.bids_filter_file)
    return bids.collect_t1w(opts.bids_dir, participants, sessions, filters, filter_file=opts.bids_filter_file,
                            database_dir=opts.bids_database_dir)


def check_images(runs) -> None:
    from bidsharmony.image.io import load_t1w

    for run in runs:
        load_t1w(run["path"])
