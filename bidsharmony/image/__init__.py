"""Image geometry: loading, resampling (antspyx), the slice grid and its undo. No BIDS, no Nipype."""
