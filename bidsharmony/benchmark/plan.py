"""What the quality benchmark runs and reports: the method's row names, its ablations (each a
CLI option changed from the defaults) and the scores in its tables. Shared by the runner and the
report writer."""

ABLATIONS = {
    # The stages of the default, each removed in turn: what the standardisation and the flow loop each add.
    "nostd": ("no standardisation (the published method)", ["--standardise", "none"]),
    "stdonly": ("standardisation alone (no flow loop)", ["--iterations", "0"]),
    "beta_fid0": ("β_fid = 0", ["--beta-fidelity", "0"]),
    "beta_grad0": ("β_grad = 0", ["--beta-gradient", "0"]),
    "alpha0": ("α = 0", ["--alpha", "0"]),
    "latent": ("latent solver", ["--solver", "latent"]),
    "meanstart": ("mean start", ["--start", "mean"]),
    "ncc": ("NCC similarity", ["--similarity", "ncc"]),
}
METHOD = "bidsharmony"
BHDIFF = "bhdiff"
METRICS = ["psnr_slice", "ssim_slice", "psnr_vol", "ssim_vol", "ncc_vol", "dice", "jump_ratio", "profile_rmse"]
