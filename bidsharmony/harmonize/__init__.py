"""The harmonization loop (docs/method.md §3): objective terms and solvers on batches of slices."""
