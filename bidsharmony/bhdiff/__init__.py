"""BlindHarmonyDiff: a 3D rectified flow from a contrast-invariant edge map to a target-domain volume.

``edges`` makes the condition, ``unet`` the velocity field v(x_t, t | edges, coordinates),
``rectified`` the flow-matching loss, the midpoint ODE sampler and the correlation refinement.
"""
