"""The flow prior: a Glow-like multiscale neural spline flow on 2D slices (pure torch)."""
