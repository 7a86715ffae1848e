"""How far can a classical denoiser take the noise scanner? Held-out TRAIN subjects only.

Each subject's noise scanner (the benchmark's: Rician, σ = 4 % of the brain's 99th percentile) is
standardised as the pipeline does; then scored against the truth in the brain (volume PSNR): the
detail matching as shipped, and each denoiser in full and blended half and three-quarters of the
way (u = v + w (D(v) − v)), the best blend an oracle (it sees the truth). ANTs non-local means
(Manjón et al. 2010) at two search radii, scikit-image's total variation, wavelet BayesShrink and
non-local means. As a bound, the best linear filter over a 5³ neighbourhood fitted by least squares
to the truth on the scored volume itself (a Wiener filter with the answer in hand: no blind linear
denoiser can do better). Needs ``pip install -e .[bench]``.

    python benchmarks/denoise_probe.py [--subjects 2]
"""

from __future__ import annotations

import json
import time

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_detail_band, model_detail_voxel, model_landmarks, read_folder
from bidsharmony.image.detail import match_detail
from bidsharmony.image.resample import to_ants
from bidsharmony.image.slices import head_mask
from bidsharmony.image.standardise import grid_landmarks, standardise
from bidsharmony.simulation import simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
BLENDS = (0.5, 0.75, 1.0)


def _denoisers(affine):
    import ants
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle, denoise_wavelet, estimate_sigma

    def nlm_ants(r):
        return lambda v: ants.denoise_image(to_ants(v - v.min(), affine), to_ants(head_mask(v).astype(np.float32), affine),
                                            noise_model="Rician", r=r).numpy() + v.min()

    def unit(f):  # scikit-image's denoisers expect about [0, 1]
        return lambda v: f(v / float(v.max())) * float(v.max())

    def nlm_sk(u):
        sigma = float(np.mean(estimate_sigma(u, channel_axis=None)))
        return denoise_nl_means(u, h=0.8 * sigma, sigma=sigma, patch_size=3, patch_distance=3, fast_mode=True)

    return {
        "ANTs NLM (search radius 2, as shipped)": nlm_ants(2),
        "ANTs NLM (search radius 3)": nlm_ants(3),
        "TV (Chambolle, weight 0.02)": unit(lambda u: denoise_tv_chambolle(u, weight=0.02)),
        "wavelet BayesShrink (soft)": unit(lambda u: denoise_wavelet(u, method="BayesShrink", mode="soft", rescale_sigma=True)),
        "scikit-image NLM (h = 0.8 σ)": unit(nlm_sk),
    }


def oracle_linear(std: np.ndarray, truth: np.ndarray, mask: np.ndarray, k: int = 5) -> np.ndarray:
    """The best linear k³ filter (and offset) from ``std`` to the truth's robust scale, fitted in the brain."""
    r, idx = k // 2, np.argwhere(mask)
    pad = np.pad(std, r, mode="edge")
    feats = np.stack([pad[idx[:, 0] + i, idx[:, 1] + j, idx[:, 2] + m] for i in range(k) for j in range(k) for m in range(k)], 1)
    design = np.c_[feats, np.ones(len(feats))]
    coef, *_ = np.linalg.lstsq(design, scores.robust_scale(truth, mask)[mask], rcond=None)
    out = np.zeros_like(std)
    out[mask] = design @ coef
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--subjects", type=int, default=2, help="held-out TRAIN subjects (the last ones)")
    p.add_argument("--name", default="denoise_probe")
    args = p.parse_args()
    common.setup(args)
    t0 = time.perf_counter()
    train = sorted(json.loads((DATA / "splits.json").read_text())["train"])
    read = read_folder(MODEL)
    (landmarks, _), band, voxel = model_landmarks(MODEL, read), model_detail_band(MODEL, read), model_detail_voxel(MODEL, read)
    gains: dict[str, list] = {}
    for sub in train[-args.subjects:]:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        src = simulate("noise", truth, tissue, nb.affines.voxel_sizes(affine), run.case_seed(0, sub, "noise"))
        at, grid = grid_landmarks(src, affine)
        std = standardise(src, landmarks, source_landmarks=at)

        def psnr(x, truth=truth, mask=mask):
            return scores.score_volume(x, truth, mask)["psnr_vol"]

        base = psnr(std)
        matched, rec = match_detail(std, affine, band, grid, voxel)
        gains.setdefault("detail matching as shipped", []).append((psnr(matched) - base, psnr(matched) - base, rec["Weight"]))
        for name, fn in _denoisers(affine).items():
            d = fn(std)
            blends = {w: psnr(std + w * (d - std)) - base for w in BLENDS}
            w = max(blends, key=blends.get)
            gains.setdefault(name, []).append((blends[1.0], blends[w], w))
        gain = psnr(oracle_linear(std, truth, mask)) - base
        gains.setdefault("bound: the best linear 5³ filter, fitted on the truth", []).append((gain, gain, 1.0))
        print(sub, f"standardised {base:.2f} dB;", "; ".join(f"{k}: {v[-1][1]:+.2f}" for k, v in gains.items()), flush=True)
    rows = [[name, f"{np.mean([g[0] for g in v]):+.2f}", f"{np.mean([g[1] for g in v]):+.2f}", ", ".join(f"{g[2]:.2f}" for g in v)]
            for name, v in gains.items()]
    common.write_results(
        args, "cpu", args.name, "Probe: how far classical denoisers take the noise scanner",
        common.table(["denoiser", "full", "best blend", "weight(s)"], rows),
        [(f"Held-out TRAIN subjects: {', '.join(train[-args.subjects:])}; gains in volume PSNR (dB) over the standardised "
         f"volume, in the brain; the best blend is an oracle's choice among {', '.join(f'{w:g}' for w in BLENDS)} (it sees "
         "the truth). ANTs NLM runs in this process, multi-threaded."), f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"gains": gains})

if __name__ == "__main__":
    main()
