"""The harmonization loop (REFERENCE.md §3): objective terms and solvers on batches of slices."""
