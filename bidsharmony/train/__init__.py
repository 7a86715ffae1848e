"""Fitting the flow prior on target-domain slices."""
