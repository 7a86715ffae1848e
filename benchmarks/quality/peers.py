"""Classical peers, scored on the same files as bidsharmony.

Histogram matching is a few lines and written here (``skimage.exposure.match_histograms`` matches
one reference image, not the target population's mean quantile function); Nyúl, z-score and WhiteStripe come from the
``intensity-normalization`` package (the benchmark extra), as published. The classical methods are
defined on the brain, so they get the brain mask; bidsharmony gets no mask at all. Population fits
(histogram matching, Nyúl) use TRAIN subjects only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from benchmarks.quality.scores import robust_scale

QUANTILES = np.linspace(0.0, 100.0, 201)


@dataclass
class Peer:
    name: str
    description: str
    population: bool = False
    state: dict = field(default_factory=dict)

    def fit(self, volumes: list[np.ndarray], masks: list[np.ndarray]) -> Peer:
        if self.name == "histmatch":
            # The target domain's mean quantile function, each subject in robust-scaled units
            # (IXI's subjects come in two unit groups; see the data README).
            self.state["target"] = np.mean(
                [np.percentile(robust_scale(v, m)[m], QUANTILES) for v, m in zip(volumes, masks)], axis=0)
        elif self.name == "nyul":
            from intensity_normalization import NyulNormalizer
            from intensity_normalization.adapters.images import NumpyImageAdapter

            nyul = NyulNormalizer()
            nyul.fit_population([NumpyImageAdapter(v) for v in volumes],
                                [NumpyImageAdapter(m.astype(np.float32)) for m in masks])
            self.state["nyul"] = nyul
        return self

    def apply(self, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float32)
        if self.name == "none":
            return v
        if self.name == "histmatch":
            source = np.percentile(v[mask], QUANTILES)
            return np.interp(v, source, self.state["target"]).astype(np.float32)
        from intensity_normalization import WhiteStripeNormalizer, ZScoreNormalizer
        from intensity_normalization.adapters.images import NumpyImageAdapter

        img, m = NumpyImageAdapter(v), NumpyImageAdapter(mask.astype(np.float32))
        if self.name == "nyul":
            return self.state["nyul"].transform(img, m).get_data().astype(np.float32)
        norm = {"zscore": ZScoreNormalizer, "whitestripe": WhiteStripeNormalizer}[self.name]()
        return norm.fit_transform(img, m).get_data().astype(np.float32)


def make_peers() -> list[Peer]:
    return [
        Peer("none", "no harmonization: the source as it is"),
        Peer("histmatch", "histogram matching of the brain to the target domain's mean quantiles (TRAIN)", True),
        Peer("nyul", "Nyúl & Udupa piecewise-linear landmarks, fit on TRAIN (intensity-normalization)", True),
        Peer("zscore", "z-score of the brain (intensity-normalization)"),
        Peer("whitestripe", "WhiteStripe: z-score of normal-appearing white matter (intensity-normalization)"),
    ]
