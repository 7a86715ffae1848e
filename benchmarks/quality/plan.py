"""What the quality benchmark runs and reports: the method's row names, its ablations (each a
CLI option changed from the defaults) and the scores in its tables. Shared by the runner and the
report writer."""

LOOP = ["--iterations", "10"]  # the published loop's length (the default runs none)
ABLATIONS = {
    # The default is the standardisation, detail matching and the bias-field stage; each row removes, adds or changes one thing.
    "classes": ("the default + the class pass (`--classes tissue`)", ["--classes", "tissue"]),
    "brain": ("the default with landmarks in the learned brain mask (`--landmark-region brain`)", ["--landmark-region", "brain"]),
    "standardise": ("the standardisation alone (no detail matching, hence no field stage)", ["--detail", "none"]),
    "field": ("standardisation + detail matching, without the bias-field stage (`--field none`)", ["--field", "none"]),
    "nlm": ("the default with non-local means (no learned denoiser)", ["--denoiser", "non-local-means"]),
    "loop": ("the default + the published loop (10 iterations)", LOOP),
    "published": ("the published method (no standardisation, no detail matching, the loop)", ["--standardise", "none", *LOOP]),
    "beta_fid0": ("loop, β_fid = 0", [*LOOP, "--beta-fidelity", "0"]),
    "beta_grad0": ("loop, β_grad = 0", [*LOOP, "--beta-gradient", "0"]),
    "alpha0": ("loop, α = 0", [*LOOP, "--alpha", "0"]),
    "latent": ("loop, latent solver", [*LOOP, "--solver", "latent"]),
    "meanstart": ("loop, mean start", [*LOOP, "--start", "mean"]),
    "ncc": ("loop, NCC similarity", [*LOOP, "--similarity", "ncc"]),
}
UNSEEN_ABLATIONS = ("classes", "brain", "standardise", "field", "nlm")  # also run on the unseen real scanners (the others run the loop: minutes per scan)
METHOD = "bidsharmony"
BHDIFF = "bhdiff"
METRICS = ["psnr_slice", "ssim_slice", "psnr_vol", "ssim_vol", "ncc_vol", "dice", "jump_ratio", "profile_rmse"]
