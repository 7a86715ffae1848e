"""What a person looks at: per-run quality metrics, figures, the participant and group HTML.

``metrics`` computes the numbers (stored in each output's sidecar, so the group level needs only
OUT_DIR), ``figures`` draws them with matplotlib, ``html`` writes ``sub-X.html`` and ``group.html``.
"""
