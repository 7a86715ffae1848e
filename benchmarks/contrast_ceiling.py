"""Could a blind per-tissue gain undo the tissue-contrast scanner? An oracle probe on held-out TRAIN subjects.

The benchmark's tissue-contrast scanner multiplies CSF, grey and white matter (classes of the
parcellation) by their own gains, smoothed by one voxel. No intensity map undoes that
(``monotone_ceiling.py``: +1.42 dB at most over the untreated volume), because voxels of one
intensity got different gains. A correction that divides by a gain field needs to know, at each
voxel, which class it belongs to. This probe gives such a correction every advantage but the class
map: the simulator's own gains (an oracle), spread over the voxels by a blind segmentation, the
posteriors of a 3-class Gaussian mixture of the standardised intensities (EM in the landmark region,
the standardisation's blind stand-in for the brain), smoothed by a Gaussian of σ voxels. The gain
field g = Σ_k p_k g_k divides the untreated source; scored with the quality benchmark's volume PSNR
in the brain against the truth, beside the untreated source, the blind standardisation and the true
gain field (the class map of the parcellation itself: the ceiling). Where this stays near the
standardisation, a blind per-tissue correction cannot reach the issue's +2 dB over the peers
without a segmentation that tells grey from white where their intensities overlap.

The same oracle gains are also spread by ANTs Atropos posteriors (Avants et al. 2011,
*Neuroinformatics* 9:381): 3 classes started by k-means in the landmark region, with a Markov random
field (smoothing β, 1-voxel neighbourhood) that makes a voxel's class depend on its neighbours': the
classical blind segmentation with a spatial prior, short of an atlas.

    python benchmarks/contrast_ceiling.py [--subjects 4]
"""

from __future__ import annotations

import time

import common
import nibabel as nb
import numpy as np
from scipy import ndimage

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_landmarks, read_folder
from bidsharmony.image.standardise import grid_landmarks, landmark_region, standardise
from bidsharmony.simulation import TISSUE_GAIN, simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
SIGMAS = (0, 1, 2, 3, 4, 6, 8, 12)  # voxels
MRF = ((0.3, (0, 2, 4, 8)), (0.6, (2,)))  # (Atropos MRF β, the σ its posteriors are smoothed by)


def mixture(x: np.ndarray, iterations: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means, standard deviations, weights) of a 3-class Gaussian mixture of ``x`` by EM, started at its 10th, 50th
    and 85th percentiles (CSF, grey, white on a T1w)."""
    mu, sd, w = np.percentile(x, [10, 50, 85]), np.full(3, x.std() / 4), np.full(3, 1 / 3)
    for _ in range(iterations):
        p = posteriors(x, mu, sd, w)
        n = p.sum(0)
        w, mu = n / n.sum(), (p * x[:, None]).sum(0) / n
        sd = np.sqrt((p * (x[:, None] - mu) ** 2).sum(0) / n) + 1e-3
    return mu, sd, w


def posteriors(x: np.ndarray, mu, sd, w) -> np.ndarray:
    ll = -0.5 * ((x[..., None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
    p = np.exp(ll - ll.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def atropos(v: np.ndarray, region: np.ndarray, zooms, beta: float) -> np.ndarray:
    """(…, 3) Atropos posteriors of ``v`` in ``region`` (k-means start, MRF of weight ``beta``), classes by rising mean."""
    import ants

    def image(a):
        return ants.from_numpy(np.ascontiguousarray(a, np.float32), spacing=tuple(float(z) for z in zooms))

    seg = ants.atropos(a=image(v), x=image(region), i="kmeans[3]", m=f"[{beta},1x1x1]", c="[5,0]")
    post = np.stack([q.numpy() for q in seg["probabilityimages"]], -1)
    hard = post[region].argmax(-1)
    return post[..., np.argsort([v[region][hard == k].mean() if (hard == k).any() else 0.0 for k in range(3)])]


def spread(post: np.ndarray, gains: np.ndarray, sigma: float) -> np.ndarray:
    """The gain field Σ_k p_k g_k of posteriors smoothed by ``sigma`` voxels (1 where no class has weight)."""
    smooth = np.stack([ndimage.gaussian_filter(post[..., k], sigma) if sigma else post[..., k] for k in range(3)], -1)
    total = smooth.sum(-1)
    return np.where(total > 1e-3, (smooth @ gains) / np.maximum(total, 1e-3), 1.0)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--subjects", type=int, default=4, help="the shipped model's first N validation subjects (TRAIN, unseen by it)")
    p.add_argument("--name", default="contrast_ceiling")
    args = p.parse_args()
    common.setup(args)
    t0 = time.perf_counter()
    read = read_folder(MODEL)
    landmarks = model_landmarks(MODEL, read)[0]
    held_out = ["sub-" + s for s in read[0]["training_data"]["subjects_validation"][: args.subjects]]
    gains = np.array([TISSUE_GAIN[k] for k in (1, 2, 3)], np.float64)
    found: dict[str, list[float]] = {}
    for sub in held_out:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        zooms = nb.affines.voxel_sizes(affine)
        src = simulate("contrast", truth, tissue, zooms, run.case_seed(0, sub, "contrast"))
        std = standardise(src, landmarks, source_landmarks=grid_landmarks(src, affine)[0])
        true_gain = ndimage.gaussian_filter(np.vectorize(TISSUE_GAIN.get, otypes=[np.float32])(tissue), 1.0)
        region = landmark_region(std, zooms)
        post = posteriors(std.astype(np.float64), *mixture(std[region].astype(np.float64)))

        def psnr(v, truth=truth, mask=mask):
            return scores.volume_scores(v, truth, mask)["psnr_vol"]

        row = {"untreated": psnr(src), "standardised (blind)": psnr(std), "true gain field (the ceiling)": min(psnr(src / true_gain), 99.0)}
        for s in SIGMAS:
            row[f"oracle gains, mixture classes, σ {s}"] = psnr(src / spread(post, gains, s))
        for beta, sigmas in MRF:
            mrf = atropos(std, region, zooms, beta)
            for s in sigmas:
                row[f"oracle gains, Atropos MRF β {beta} classes, σ {s}"] = psnr(src / spread(mrf, gains, s))
        for k, v in row.items():
            found.setdefault(k, []).append(v)
        print(sub, ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    base = np.array(found["standardised (blind)"])
    rows = [[k, f"{np.mean(v):.2f}", f"{np.mean(np.array(v) - base):+.2f}", " / ".join(f"{x:.2f}" for x in v)] for k, v in found.items()]
    common.write_results(
        args, "cpu", args.name, "Probe: a per-tissue gain with a blind class map on the tissue-contrast scanner (oracle gains)",
        common.table(["correction", "volume PSNR (dB)", "over the standardisation", "per head"], rows),
        [(f"Held-out TRAIN subjects: {', '.join(held_out)} (the shipped model's validation subjects); volume PSNR in the brain "
          "against the truth (capped at 99 dB). Gains: the simulator's own (CSF ×1.6, GM ×1.15, WM ×0.95), spread by the "
          "posteriors of a 3-class mixture of the standardised intensities (or of Atropos with an MRF), smoothed by σ voxels; "
          "the source divided by them."),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"psnr_vol": found, "subjects": held_out})


if __name__ == "__main__":
    main()
