"""The methods paragraph ("boilerplate") of a run, with its references, written from the run's
sidecar alone: the method, model (name, preset, sha256), every harmonization parameter, the voxel
size, the output space and the software versions that produced it. Paste it into a paper.

Citations are numbered in order of first mention; ``{name}`` in a template is a citation key.
"""

from __future__ import annotations

import re
from html import escape

from bidsharmony.space import DEFAULT

# key: (plain-text reference, BibTeX entry)
REFERENCES = {
    "bidsharmony": (
        "bidsharmony developers. bidsharmony: blind harmonization of T1-weighted MRI with a normalizing-flow prior, "
        "as a BIDS-App. Version {version}. https://github.com/bidsharmony/bidsharmony",
        "@software{{bidsharmony,\n  author = {{{{bidsharmony developers}}}},\n  title = {{bidsharmony: blind harmonization of "
        "T1-weighted MRI with a normalizing-flow prior, as a BIDS-App}},\n  version = {{{version}}},\n"
        "  url = {{https://github.com/bidsharmony/bidsharmony}}\n}}",
    ),
    "blindharmony": (
        'Jeong H, Byun H, Kang DU, Lee J. BlindHarmony: "Blind" harmonization for MR images via flow model. '
        "Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV), 2023. arXiv:2305.10732",
        "@inproceedings{{jeong2023blindharmony,\n  author = {{Jeong, Hwihun and Byun, Heejoon and Kang, Dong Un and Lee, Jongho}},\n"
        "  title = {{{{BlindHarmony}}: ``Blind'' Harmonization for {{MR}} Images via Flow Model}},\n"
        "  booktitle = {{Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)}},\n  year = {{2023}},\n"
        "  eprint = {{2305.10732}},\n  archivePrefix = {{arXiv}}\n}}",
    ),
    "mrflow": (
        "Jeong H, Kang DU, Kim J, Lee J. MRFlow: normalizing flow-based MRI harmonization. "
        "Proceedings of the International Society for Magnetic Resonance in Medicine (ISMRM), 2023",
        "@inproceedings{{jeong2023mrflow,\n  author = {{Jeong, Hwihun and Kang, Dong Un and Kim, Jiye and Lee, Jongho}},\n"
        "  title = {{{{MRFlow}}: normalizing flow-based {{MRI}} harmonization}},\n"
        "  booktitle = {{Proceedings of the International Society for Magnetic Resonance in Medicine (ISMRM)}},\n  year = {{2023}}\n}}",
    ),
    "nyul": (
        "Nyúl LG, Udupa JK, Zhang X. New variants of a method of MRI scale standardization. "
        "IEEE Transactions on Medical Imaging 19(2):143-150, 2000",
        "@article{{nyul2000standardization,\n  author = {{Ny{{\\'u}}l, L{{\\'a}}szl{{\\'o}} G. and Udupa, Jayaram K. and Zhang, Xuan}},\n"
        "  title = {{New variants of a method of {{MRI}} scale standardization}},\n"
        "  journal = {{IEEE Transactions on Medical Imaging}},\n  volume = {{19}},\n  number = {{2}},\n  pages = {{143--150}},\n"
        "  year = {{2000}}\n}}",
    ),
    "manjon": (
        "Manjón JV, Coupé P, Martí-Bonmatí L, Collins DL, Robles M. Adaptive non-local means denoising of MR images with "
        "spatially varying noise levels. Journal of Magnetic Resonance Imaging 31(1):192-203, 2010. doi:10.1002/jmri.22003",
        "@article{{manjon2010adaptive,\n  author = {{Manj{{\\'o}}n, Jos{{\\'e}} V. and Coup{{\\'e}}, Pierrick and "
        "Mart{{\\'i}}-Bonmat{{\\'i}}, Luis and Collins, D. Louis and Robles, Montserrat}},\n  title = {{Adaptive non-local means "
        "denoising of {{MR}} images with spatially varying noise levels}},\n  journal = {{Journal of Magnetic Resonance Imaging}},\n"
        "  volume = {{31}},\n  number = {{1}},\n  pages = {{192--203}},\n  year = {{2010}},\n  doi = {{10.1002/jmri.22003}}\n}}",
    ),
    "nsf": (
        "Durkan C, Bekasov A, Murray I, Papamakarios G. Neural spline flows. "
        "Advances in Neural Information Processing Systems 32 (NeurIPS), 2019",
        "@inproceedings{{durkan2019nsf,\n  author = {{Durkan, Conor and Bekasov, Artur and Murray, Iain and Papamakarios, George}},\n"
        "  title = {{Neural Spline Flows}},\n  booktitle = {{Advances in Neural Information Processing Systems}},\n"
        "  volume = {{32}},\n  year = {{2019}}\n}}",
    ),
    "unet3d": (
        "Çiçek Ö, Abdulkadir A, Lienkamp SS, Brox T, Ronneberger O. 3D U-Net: learning dense volumetric segmentation from "
        "sparse annotation. MICCAI 2016, LNCS 9901:424-432. doi:10.1007/978-3-319-46723-8_49",
        "@inproceedings{{cicek2016unet3d,\n  author = {{{{\\c{{C}}}}i{{\\c{{c}}}}ek, {{\\\"O}}zg{{\\\"u}}n and Abdulkadir, Ahmed and "
        "Lienkamp, Soeren S. and Brox, Thomas and Ronneberger, Olaf}},\n  title = {{{{3D U-Net}}: Learning Dense Volumetric "
        "Segmentation from Sparse Annotation}},\n  booktitle = {{Medical Image Computing and Computer-Assisted Intervention "
        "({{MICCAI}})}},\n  pages = {{424--432}},\n  year = {{2016}},\n  doi = {{10.1007/978-3-319-46723-8_49}}\n}}",
    ),
    "n4": (
        "Tustison NJ, Avants BB, Cook PA, Zheng Y, Egan A, Yushkevich PA, Gee JC. N4ITK: improved N3 bias correction. IEEE "
        "Transactions on Medical Imaging. 2010;29(6):1310-1320. doi:10.1109/TMI.2010.2046908",
        "@article{{tustison2010n4,\n  author = {{Tustison, Nicholas J. and Avants, Brian B. and Cook, Philip A. and Zheng, Yuanjie "
        "and Egan, Alexander and Yushkevich, Paul A. and Gee, James C.}},\n  title = {{{{N4ITK}}: Improved {{N3}} Bias Correction}},\n"
        "  journal = {{IEEE Transactions on Medical Imaging}},\n  volume = {{29}},\n  number = {{6}},\n  pages = {{1310--1320}},\n"
        "  year = {{2010}},\n  doi = {{10.1109/TMI.2010.2046908}}\n}}",
    ),
    "efronmorris": (
        "Efron B, Morris C. Stein's estimation rule and its competitors: an empirical Bayes approach. Journal of the American "
        "Statistical Association. 1973;68(341):117-130. doi:10.1080/01621459.1973.10481350",
        "@article{{efron1973stein,\n  author = {{Efron, Bradley and Morris, Carl}},\n  title = {{Stein's Estimation Rule and Its "
        "Competitors: An Empirical {{Bayes}} Approach}},\n  journal = {{Journal of the American Statistical Association}},\n"
        "  volume = {{68}},\n  number = {{341}},\n  pages = {{117--130}},\n  year = {{1973}},\n  doi = {{10.1080/01621459.1973.10481350}}\n}}",
    ),
    "bhdiff": (
        "BlindHarmonyDiff: Efficient and robust 3D blind harmonization for large domain gaps. arXiv:2505.00133, 2025",
        "@misc{{blindharmonydiff2025,\n  title = {{Efficient and robust {{3D}} blind harmonization for large domain gaps}},\n"
        "  note = {{BlindHarmonyDiff}},\n  year = {{2025}},\n  eprint = {{2505.00133}},\n  archivePrefix = {{arXiv}}\n}}",
    ),
    "ants": (
        "Tustison NJ, Cook PA, Holbrook AJ, Johnson HJ, Muschelli J, Devenyi GA, et al. The ANTsX ecosystem for "
        "quantitative biological and medical imaging. Scientific Reports. 2021;11:9068. doi:10.1038/s41598-021-87564-6",
        "@article{{tustison2021antsx,\n  author = {{Tustison, Nicholas J. and Cook, Philip A. and Holbrook, Andrew J. and Johnson, "
        "Hans J. and Muschelli, John and Devenyi, Gabriel A. and others}},\n  title = {{The {{ANTsX}} ecosystem for quantitative "
        "biological and medical imaging}},\n  journal = {{Scientific Reports}},\n  volume = {{11}},\n  pages = {{9068}},\n"
        "  year = {{2021}},\n  doi = {{10.1038/s41598-021-87564-6}}\n}}",
    ),
    "nipype": (
        "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, Waskom ML, Ghosh SS. Nipype: a flexible, lightweight "
        "and extensible neuroimaging data processing framework in Python. Frontiers in Neuroinformatics. 2011;5:13. "
        "doi:10.3389/fninf.2011.00013",
        "@article{{gorgolewski2011nipype,\n  author = {{Gorgolewski, Krzysztof and Burns, Christopher D. and Madison, Cindee and "
        "Clark, Dav and Halchenko, Yaroslav O. and Waskom, Michael L. and Ghosh, Satrajit S.}},\n  title = {{Nipype: a flexible, "
        "lightweight and extensible neuroimaging data processing framework in {{Python}}}},\n  journal = {{Frontiers in "
        "Neuroinformatics}},\n  volume = {{5}},\n  pages = {{13}},\n  year = {{2011}},\n  doi = {{10.3389/fninf.2011.00013}}\n}}",
    ),
    "pybids": (
        "Yarkoni T, Markiewicz CJ, de la Vega A, Gorgolewski KJ, Salo T, Halchenko YO, et al. PyBIDS: Python tools for BIDS "
        "datasets. Journal of Open Source Software. 2019;4(40):1294. doi:10.21105/joss.01294",
        "@article{{yarkoni2019pybids,\n  author = {{Yarkoni, Tal and Markiewicz, Christopher J. and de la Vega, Alejandro and "
        "Gorgolewski, Krzysztof J. and Salo, Taylor and Halchenko, Yaroslav O. and others}},\n  title = {{{{PyBIDS}}: Python "
        "tools for {{BIDS}} datasets}},\n  journal = {{Journal of Open Source Software}},\n  volume = {{4}},\n  number = {{40}},\n"
        "  pages = {{1294}},\n  year = {{2019}},\n  doi = {{10.21105/joss.01294}}\n}}",
    ),
    "pytorch": (
        "Paszke A, Gross S, Massa F, Lerer A, Bradbury J, Chanan G, et al. PyTorch: an imperative style, high-performance "
        "deep learning library. Advances in Neural Information Processing Systems 32 (NeurIPS), 2019",
        "@inproceedings{{paszke2019pytorch,\n  author = {{Paszke, Adam and Gross, Sam and Massa, Francisco and Lerer, Adam and "
        "Bradbury, James and Chanan, Gregory and others}},\n  title = {{{{PyTorch}}: An Imperative Style, High-Performance Deep "
        "Learning Library}},\n  booktitle = {{Advances in Neural Information Processing Systems}},\n  volume = {{32}},\n"
        "  year = {{2019}}\n}}",
    ),
}

_SIMILARITY = {"cosine": "uncentred cosine similarity", "ncc": "normalised cross-correlation (mean removed)"}
_START = {"source": "the source slice", "mean": "the model's mean target slice at that slice position"}


def _num(v) -> str:
    """Numbers as a methods section writes them: 1000, 0.001, 1e-05."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "?" if v is None else str(v)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e6:
        return str(int(v))
    return f"{v:g}"


def _v(versions: dict, name: str) -> str:
    return f" {versions[name]}" if versions.get(name) else ""


def _flow_text(meta: dict, p: dict, model: dict) -> str:
    if not p.get("iterations"):
        return ("The flow prior's harmonization loop was not run (0 iterations, bidsharmony's default: on its benchmark the loop "
                "lowered the accuracy of standardised images), so the output is the standardised image"
                + (" after its detail matching." if (meta.get("Standardisation") or {}).get("Detail", {}).get("Action") not in (None, "none")
                   else ".")
                if meta.get("Standardisation") else
                "The flow prior's harmonization loop was not run (0 iterations), so the image was not changed.")
    shape = model.get("SliceShape") or DEFAULT.slice_shape
    solver = (f"Adam on the latent code (step {_num(p.get('latent_lr'))}) with gradients through the inverse flow"
              if p.get("solver") == "latent" else
              "the published alternating scheme (a step on the image towards the source, then a shrinking step on the "
              "latent code through the flow)")  # fmt: skip
    return (
        f"The prior is a normalizing flow with rational-quadratic spline transforms {{nsf}}, trained on T1w slices of a single "
        f"target scanner only. Each slice was cut on a {shape[0]} × {shape[1]} grid centred on the head and scaled to 0–1 "
        f"by its own minimum and maximum. The harmonized slice x = f⁻¹(z) minimises −β_fidelity·S(x, x_s) + "
        f"β_gradient·‖M∇x‖₁ + α‖z‖², where S is the {_SIMILARITY.get(p.get('similarity'), str(p.get('similarity')))} to "
        f"the source slice x_s and M masks the flat parts of the source's head (its edges are left free), with "
        f"β_fidelity = {_num(p.get('beta_fidelity'))}, β_gradient = {_num(p.get('beta_gradient'))} and "
        f"α = {_num(p.get('alpha'))}; it was "
        f"found with {_num(p.get('iterations'))} iterations of {solver}, starting from "
        f"{_START.get(p.get('start'), str(p.get('start')))} (random seed {_num(p.get('seed'))}). Each slice's scaling was then "
        f"undone with its own minimum and maximum."
    )


def _bhdiff_text(meta: dict, p: dict, model: dict) -> str:
    patch = p.get("patch") or 0
    where = (f"in overlapping cubes of {_num(patch)} voxels, averaged at each evaluation" if patch
             else "on the whole volume at once")
    return (
        "The model is a 3D rectified flow (a U-Net velocity field) that generates the target-domain image from "
        "contrast-invariant 3D edges of the source image. It was sampled with "
        f"{_num(p.get('ode_steps'))} midpoint steps {where}, followed by {_num(p.get('refine_steps'))} refinement steps of "
        f"size {_num(p.get('refine_step'))} that raise the correlation with the source (random seed {_num(p.get('seed'))})."
    )


def methods(meta: dict) -> tuple[str, list[str]]:
    """(the paragraph, its citation keys in order) for one run's sidecar."""
    model = meta.get("Model") or {}
    p = meta.get("Parameters") or {}
    versions = meta.get("SoftwareDependencies") or {}
    method = str(meta.get("Method", ""))
    if method.startswith("identity"):
        return _identity_text(meta, versions)
    bhdiff = method.startswith("bhdiff")
    voxel = model.get("VoxelSize") or DEFAULT.voxel_mm
    model_text = f"the model {model.get('Name') or 'unnamed'}"
    details = [f"{model['Preset']} preset"] if model.get("Preset") else []
    details.append(f"weights sha256 {model.get('Sha256') or 'not recorded'}")
    if model.get("ValidationBitsPerDim") is not None:
        details.append(f"validation {_num(model['ValidationBitsPerDim'])} bits/dim")
    model_text += f" ({'; '.join(details)})"
    if bhdiff:
        intro = ("harmonized with BlindHarmonyDiff {bhdiff}, the 3D successor of BlindHarmony {blindharmony}, which pulls "
                 "images of unseen scanners into the domain of one target scanner while keeping their anatomy")
    else:
        intro = ("harmonized with BlindHarmony {blindharmony} {mrflow}, a blind harmonization that pulls images of scanners "
                 "never seen in training into the domain of one target scanner with a normalizing-flow prior of that "
                 "scanner's images, while keeping their anatomy")
    native = not str(meta.get("OutputSpace", "native")).startswith("RAS")
    space = ("The change made on that grid was resampled onto the source image's own grid and added to its original "
             "voxels" + (" (put through the same intensity map)" if meta.get("Standardisation") else "")
             + ", so the output keeps the input's resolution, field of view and header."
             if native else f"The output was kept on the {_num(voxel)} mm isotropic RAS grid.")
    text = (
        f"T1-weighted (T1w) images were {intro}, as implemented in bidsharmony {meta.get('SoftwareVersion') or '?'} "
        "{bidsharmony}. Each T1w image was reoriented to RAS and resampled to "
        f"{_num(voxel)} mm isotropic voxels (linear interpolation) with ANTs (antspyx{_v(versions, 'antspyx')}) {{ants}}. "
        + _standardisation_text(meta)
        + f"The target prior was {model_text}. "
        + (_bhdiff_text(meta, p, model) if bhdiff else _flow_text(meta, p, model))
        + f" {space} The workflow was run with Nipype{_v(versions, 'nipype')} {{nipype}}, the input dataset was queried with "
        f"PyBIDS{_v(versions, 'pybids')} {{pybids}}, and the networks ran in PyTorch{_v(meta, 'TorchVersion')} {{pytorch}}."
    )
    keys = list(dict.fromkeys(_CITE.findall(text)))
    return text, keys


def _identity_text(meta: dict, versions: dict) -> tuple[str, list[str]]:
    """The baseline run: nothing was harmonized, and the paragraph says so."""
    text = (f"T1-weighted (T1w) images were passed through bidsharmony {meta.get('SoftwareVersion') or '?'} {{bidsharmony}} "
            "without harmonization (its identity method, a baseline): each image was reoriented to RAS and resampled to "
            f"{_num(DEFAULT.voxel_mm)} mm isotropic voxels with ANTs (antspyx{_v(versions, 'antspyx')}) {{ants}} and reassembled unchanged. The "
            f"workflow was run with Nipype{_v(versions, 'nipype')} {{nipype}}, and the input dataset was queried with "
            f"PyBIDS{_v(versions, 'pybids')} {{pybids}}.")
    return text, list(dict.fromkeys(_CITE.findall(text)))


def _standardisation_text(meta: dict) -> str:
    std = meta.get("Standardisation")
    if not isinstance(std, dict):
        return ""
    pct = ", ".join(_num(x) for x in std.get("Percentiles") or [])
    return ("Its intensities were then standardised onto the target's scale, volume-wide and before any slicing, with a "
            "piecewise-linear map through intensity landmarks in the manner of Nyúl et al. {nyul}: the image minimum and the "
            f"{pct}th percentiles of {_region_text(std.get('Region'))}, mapped onto the mean landmarks of the "
            "target's training images measured in the same way; the output is on that standard scale. "
            + _class_pass_text(std.get("ClassPass"))
            + _field_text(std.get("Field"))
            + _detail_text(std.get("Detail")))


def _region_text(region) -> str:
    if region == "learned brain mask":
        return ("the brain, as found by a small 3D U-Net trained on the target's training images and their brain masks "
                "(its input is the image's intensity ranks within the head, which no monotone change of contrast alters)")
    return "a region deep inside the head (no brain mask)"


def _class_pass_text(cp) -> str:
    if not isinstance(cp, dict):
        return ""
    return ("A second monotone piecewise-linear map followed, through quantiles within the three intensity classes of a "
            "1D k-means of the same region (CSF-, grey- and white-like) onto the target's training images' own class "
            "quantiles, so that the image keeps its tissue composition rather than taking the target's mean one. ")


def _field_text(field) -> str:
    if not isinstance(field, dict):
        return ""
    if field.get("Skipped"):
        return ("Its smooth intensity (bias) field was left as acquired: the field is estimated only where the detail stage "
                "leaves an image alone, as noise, blur and tissue-contrast changes mislead the estimate. ")
    text = ("Its smooth intensity (bias) field was then compared with the target scanner's: N4 {n4} estimated the field on a "
            "coarse grid over the head; the part of it the target's training images' own N4 fields explain (their mean and "
            f"{int(field.get('Components', 0))} principal components) was kept, and what was left over was corrected only if "
            "larger than any training image's own leftover (d²_max), weighted by 1 − d²_max/d² {efronmorris} (d²: the "
            f"leftover's mean square), here {float(field.get('Weight', 0)):.2f}")
    if not float(field.get("Weight", 0)):
        return text + ", so the field was left as acquired. "
    lo, hi = (float(x) for x in field.get("CorrectionRange") or [1, 1])
    return (text + f"; the acquired image was multiplied by the weighted correction (factors {lo:.3f}–{hi:.3f}, 1st–99th "
            "percentile in the head) and standardised again, its landmarks measured on the same region. ")


def _detail_text(detail) -> str:
    if not isinstance(detail, dict):
        return ""
    lo, mean, hi = (float(x) for x in detail.get("Band") or [0, 0, 0])
    level = (f"Its detail level (the robust standard deviation of the fine residual over the edge strength) was "
             f"{_num(round(float(detail.get('Level', 0)), 3))}, against the target's training range {lo:.3f}–{hi:.3f}")
    action = detail.get("Action")
    if action == "denoise" and detail.get("Denoiser") == "learned":
        return (level + "; the image was therefore denoised by a small 3D U-Net trained on the target scanner's images "
                "alone, to remove added Rician noise {unet3d}, with its change applied at weight "
                f"{float(detail.get('Weight', 0)):.2f} (in full from half the range's width above it; computed on the "
                f"{'target voxel size' if detail.get('DenoisedOn') == 'target voxel size' else 'native grid'}). ")
    if action == "denoise":
        return (level + "; the image was therefore blended with its adaptive non-local-means denoising {manjon} (ANTs, "
                f"Rician model; weight {float(detail.get('Weight', 0)):.2f}) until its level was the target's mean, {mean:.3f}. ")
    if action == "sharpen":
        return (level + "; the image was therefore sharpened with an unsharp mask (Gaussian, amount "
                f"{float(detail.get('Weight', 0)):.2f}) until its level was the target's mean, {mean:.3f}. ")
    return level + ", so its noise and sharpness were left as acquired. "


def _numbered(text: str, keys: list[str]) -> str:
    text = _CITE.sub(lambda m: f"[{keys.index(m.group(1)) + 1}]", text)
    return re.sub(r"\] \[", ", ", text)  # [1] [2] -> [1, 2]


# A citation in the paragraph's text: {key} for the keys of REFERENCES only, so that braces in a
# model's name or a parameter are text.
_CITE = re.compile(r"\{(" + "|".join(REFERENCES) + r")\}")


def reference(key: str, version: str = "") -> str:
    return REFERENCES[key][0].format(version=version or "?")


def bibtex(key: str, version: str = "") -> str:
    return REFERENCES[key][1].format(version=version or "?")


def plain(meta: dict) -> str:
    """The paragraph and its numbered references, as plain text."""
    text, keys = methods(meta)
    refs = [f"[{i}] {reference(k, meta.get('SoftwareVersion'))}." for i, k in enumerate(keys, 1)]
    return _numbered(text, keys) + "\n\nReferences\n" + "\n".join(refs) + "\n"


def html(metas: list[dict], runs: list[list[str]] | None = None) -> str:
    """An HTML block: one paragraph per distinct text over ``metas`` (runs of the same settings
    share it; ``runs`` names each meta's runs), each with its references and BibTeX."""
    paragraphs: dict[str, tuple[dict, list[str], list[str]]] = {}
    for i, meta in enumerate(metas):
        raw, keys = methods(meta)
        paragraphs.setdefault(_numbered(raw, keys), (meta, keys, []))[2].extend(runs[i] if runs else [])
    out = ['<div class="boilerplate">']
    for text, (meta, keys, names) in paragraphs.items():
        version = meta.get("SoftwareVersion")
        if len(paragraphs) > 1 and names:
            out.append(f"<p class=\"for\">For {escape(', '.join(names))}:</p>")
        out.append(f'<blockquote class="methods">{escape(text)}</blockquote>')
        out.append("<ol class=\"references\">" + "".join(f"<li>{escape(reference(k, version))}.</li>" for k in keys) + "</ol>")
        entries = "\n\n".join(bibtex(k, version) for k in keys)
        out.append(f"<details><summary>BibTeX</summary><pre>{escape(entries)}</pre></details>")
    out.append("</div>")
    return "\n".join(out)
