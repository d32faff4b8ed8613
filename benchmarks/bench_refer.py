"""Benchmark: which images the app should refer, and which class-activation map to show.

Part ``ood`` ("Refer"). On a model bundle and its ``split.csv``:

- fits every out-of-distribution score of ``dermaclass.serving.refer`` (Mahalanobis, Lee et al.
  2018; k-nearest neighbours, Sun et al. 2022; energy, Liu et al. 2020) on the training
  split's features (``models.WithFeatures``: a pooled inner backbone layer,
  ``models.feature_layer``; one view, as ``serving.refit.fit_ood`` does), and sets each cut-off so that 95 % of the validation split
  passes, scored with the bundle's TTA as the app scores;
- scores HAM10000 test (in distribution), both external dermoscopy sets (other clinics:
  dermoscopy that should mostly pass), and images that are not dermoscopy, by kind: colour
  photographs (scikit-image's and scikit-learn's sample images, random crops), greyscale
  photographs, other medical images (a retinal fundus, immunohistochemistry, a
  microaneurysm angiogram), headless-chromium screenshots of the project's report and of
  HTML documentation, flat fields (including skin tones), colour gradients, noise, stripes,
  and tiny images (1x1 up to 48x36 pixels). Dermoscopy with heavy artefacts (blur,
  over- and under-exposure, a large occlusion) is reported separately: it is in the
  model's domain but degraded, and there is no target for it;
- reports per score and kind the AUROC against HAM test and the share referred, for the
  score alone and for the whole rule (input checks, then the score); and the one-colour
  share (refer.one_colour_share) and the colourfulness (refer.colourfulness) over every
  HAM10000 and external image, which set the input checks' cut-offs.

Part ``cam`` ("Show"). On ``--n-cam`` HAM10000 test images with lesion masks:
Grad-CAM at the body's last feature map (4x3 at 128x96) and at earlier, finer blocks,
Grad-CAM++, EigenCAM, LayerCAM and a layer-combined Grad-CAM (all pytorch-grad-cam), scored
by the pointing game (is the heatmap's peak inside the lesion?) and by the share of the
heatmap's mass inside the lesion; a centred Gaussian is the baseline a CAM has to beat.

Prints tables and writes benchmarks/results/refer.json. Nothing is asserted.

    python benchmarks/bench_refer.py [--model models/ham10000-effnet-lite0] [--part ood cam] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from dermaclass.data.images import fit_to_size, load_rgb
from dermaclass.fileio import write_json
from dermaclass.serving import refer
from dermaclass.serving.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT / ".." / "shared" / "data"
DATA = SHARED / "ham10000"
EXTERNAL = {"derm7pt": SHARED / "derm7pt", "isic2017": SHARED / "isic2017", "ph2": SHARED / "ph2"}
RUST_DOCS = Path("/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html")
SKIN_TONES = [
    (255, 224, 196),
    (234, 192, 134),
    (224, 172, 105),
    (198, 134, 66),
    (141, 85, 36),
    (92, 56, 30),
    (240, 200, 180),
    (210, 160, 140),
]
NON_DERMOSCOPY = [
    "photo",
    "greyscale photo",
    "other medical",
    "screenshot",
    "flat",
    "gradient",
    "noise",
    "stripes",
    "tiny",
]


# ---- images that are not dermoscopy ------------------------------------------------------------
def _crops(image: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The whole image and n - 1 random crops of 30-100 % of its width at 4:3."""
    out = [image]
    h, w = image.shape[:2]
    for _ in range(n - 1):
        cw = int(w * rng.uniform(0.3, 1.0))
        ch = min(h, int(cw * 0.75))
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        out.append(np.ascontiguousarray(image[y0 : y0 + ch, x0 : x0 + cw]))
    return out


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def screenshots(out_dir: Path, *, quick: bool) -> list[np.ndarray]:
    """Headless-chromium screenshots of the bundled report and of local HTML documentation."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found: no screenshots")
        return []
    pages = [ROOT / "models" / "ham10000-effnet-lite0" / "report" / "report.html"]
    if RUST_DOCS.is_dir():
        pages += [
            RUST_DOCS / p
            for p in [
                "index.html",
                "std/index.html",
                "book/index.html",
                "book/ch03-02-data-types.html",
                "std/vec/struct.Vec.html",
                "reference/introduction.html",
                "error_codes/E0308.html",
                "cargo/index.html",
                "rust-by-example/hello.html",
            ]
        ]
    pages = [p for p in pages if p.is_file()][: 3 if quick else None]
    shots = []
    for i, page in enumerate(pages):
        for size in ["1200,900", "800,600"]:
            png = out_dir / f"shot{i}-{size.replace(',', 'x')}.png"
            subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    f"--screenshot={png}",
                    f"--window-size={size}",
                    page.as_uri(),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )
            if png.is_file():
                shots.append(_rgb(np.asarray(Image.open(png).convert("RGB"))))
    return shots


def non_dermoscopy(
    *, crops: int, n_synthetic: int, shot_dir: Path, quick: bool, seed: int = 0
) -> tuple[list[np.ndarray], list[str]]:
    """Images that are clearly not dermoscopy, at their own resolution, with their kind."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    kinds: list[str] = []

    def add(kind: str, many: list[np.ndarray]) -> None:
        images.extend(many)
        kinds.extend([kind] * len(many))

    colour = [
        skd.astronaut(),
        skd.chelsea(),
        skd.coffee(),
        skd.rocket(),
        skd.hubble_deep_field(),
        *load_sample_images().images,
    ]
    grey = [skd.camera(), skd.coins(), skd.brick(), skd.grass(), skd.gravel(), skd.moon(), skd.clock()]
    medical = [skd.retina(), skd.immunohistochemistry(), skd.microaneurysms()]
    for kind, sources in [("photo", colour), ("greyscale photo", grey), ("other medical", medical)]:
        for src in sources:
            add(kind, _crops(_rgb(src), crops, rng))
    for shot in screenshots(shot_dir, quick=quick):
        add("screenshot", _crops(shot, max(2, crops // 2), rng))
    w, h = 200, 150  # synthetic fields at HAM10000's stored size
    flat, grad, noise, stripes = [], [], [], []
    for i in range(n_synthetic):
        tone = np.array(SKIN_TONES[i % len(SKIN_TONES)] if i % 2 == 0 else rng.integers(0, 256, 3))
        flat.append(np.clip(tone + rng.normal(0, 2.0, (h, w, 3)), 0, 255).astype(np.uint8))  # sensor noise
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, w)[None, :, None] if i % 2 == 0 else np.linspace(0, 1, h)[:, None, None]
        grad.append(np.broadcast_to(a + (b - a) * t, (h, w, 3)).astype(np.uint8).copy())
        noise.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        period = int(rng.integers(4, 24))
        band = ((np.arange(w) // period) % 2)[None, :, None]
        stripes.append(np.broadcast_to(np.where(band, a, b), (h, w, 3)).astype(np.uint8).copy())
    add("flat", flat)
    add("gradient", grad)
    add("noise", noise)
    add("stripes", stripes)
    add("tiny", [rng.integers(0, 256, (s[1], s[0], 3), dtype=np.uint8) for s in [(1, 1), (16, 16), (32, 24), (48, 36)]])
    return images, kinds


def artefacts(images: list[np.ndarray], rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    """Heavily degraded dermoscopy: blur, over-/under-exposure, a large occlusion."""
    out, kinds = [], []
    for i, a in enumerate(images):
        k = i % 4
        if k == 0:
            out.append(np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius=6))))
            kinds.append("blurred")
        elif k == 1:
            out.append(np.clip(a.astype(np.float32) * 2.5 + 40, 0, 255).astype(np.uint8))
            kinds.append("overexposed")
        elif k == 2:
            out.append((a.astype(np.float32) * 0.2).astype(np.uint8))
            kinds.append("underexposed")
        else:
            b = a.copy()
            h, w = b.shape[:2]
            y0, x0 = rng.integers(0, h // 3), rng.integers(0, w // 3)
            b[y0 : y0 + 2 * h // 3, x0 : x0 + 2 * w // 3] = rng.integers(0, 60)
            out.append(b)
            kinds.append("occluded")
    return out, kinds


# ---- scoring ---------------------------------------------------------------------------------
def run_model(pred: Predictor, raw: list[np.ndarray], *, tta: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logits, features) of every network (one, or an ensemble's members) for raw RGB images,
    each network at its own input size, as the app computes them."""
    views = [pred.preprocess_all(a) for a in raw]
    return pred.member_outputs({size: [v[size] for v in views] for size in pred.input_sizes}, tta=tta)


def checks(raw: list[np.ndarray]) -> list[str | None]:
    """The input check's verdict per image: None (passes), 'refused' or 'one colour'."""
    out: list[str | None] = []
    for a in raw:
        try:
            out.append("one colour" if refer.input_problem(a) else None)
        except refer.InputProblem:
            out.append("refused")
    return out


def member_disagreement(member_probs: list[np.ndarray]) -> np.ndarray:
    """The mutual information between the answer and the member (entropy of the mean
    prediction minus the mean of the members' entropies): 0 when every network gives the same
    distribution, large when confident networks contradict each other (Lakshminarayanan et al.
    2017's second signal). One value per image."""

    from scipy.stats import entropy

    stack = np.stack(member_probs)  # (members, images, classes)
    return entropy(stack.mean(axis=0), axis=-1) - entropy(stack, axis=-1).mean(axis=0)


def ood_part(pred: Predictor, args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    data = Path(args.data)
    split = pd.read_csv(Path(args.model) / "split.csv")
    meta = pd.read_csv(data / "HAM10000_metadata.csv").set_index("image_id")
    ids = {
        s: split.loc[split["split"] == s, "image"].astype(str).map(lambda p: Path(p).stem).tolist()
        for s in ("train", "valid", "test")
    }
    if args.quick:
        ids = {s: v[:300] for s, v in ids.items()}
    tta = pred.tta
    t0 = time.perf_counter()

    def ham(which: list[str]) -> list[np.ndarray]:
        return [np.asarray(load_rgb(data / "images" / f"{i}.jpg")) for i in which]

    raw = {s: ham(v) for s, v in ids.items()}
    # As serving.refit.fit_ood does: the fit on one view of the training images, the rest as the app scores.
    out = {s: run_model(pred, raw[s], tta=tta and s != "train") for s in raw}
    labels = np.array([pred.classes.index(meta.loc[i, "dx"]) for i in ids["train"]])
    # An ensemble serves one score, the mean of its members' margins, with its own cut-off (0): it
    # is measured as served. One network: every method is fitted here on its train split.
    as_served = pred.members and {refer.ENSEMBLE_OOD: pred.ood_threshold}
    # The members' disagreement, measured beside the served score as a candidate second signal
    # (not served): its cut-off is set on the valid split like the one network's scores, which
    # two of three cross-fitted members trained on, so its referral rates lean high; AUROCs don't.
    compared = {**as_served, "disagreement": None} if as_served else {}
    print(f"HAM10000 features: {sum(len(v) for v in ids.values())} images in {time.perf_counter() - t0:.0f} s")

    ext_raw: dict[str, list[np.ndarray]] = {}
    for name, root in EXTERNAL.items():
        if (root / "images").is_dir():
            files = sorted((root / "images").iterdir())[: 200 if args.quick else None]
            ext_raw[name] = [np.asarray(load_rgb(f)) for f in files]
    ext = {k: run_model(pred, v, tta=tta) for k, v in ext_raw.items()}

    with tempfile.TemporaryDirectory() as tmp:
        od_raw, od_kinds = non_dermoscopy(
            crops=4 if args.quick else 8, n_synthetic=8 if args.quick else 24, shot_dir=Path(tmp), quick=args.quick
        )
    art_raw, art_kinds = artefacts(raw["test"][: 80 if args.quick else 400], np.random.default_rng(1))
    # Tiny images never reach the model (the input check refuses them): score the rest.
    od_pass = [i for i, a in enumerate(od_raw) if min(a.shape[:2]) >= refer.MIN_SIDE]
    od = run_model(pred, [od_raw[i] for i in od_pass], tta=tta)
    art = run_model(pred, art_raw, tta=tta)
    od_checks, test_checks, art_checks = checks(od_raw), checks(raw["test"]), checks(art_raw)
    ext_checks = {k: checks(v) for k, v in ext_raw.items()}

    # The one-colour share over every dermoscopic image: the input check's cut-off must pass all of them.
    shares = {
        "ham10000": [refer.one_colour_share(a) for s in ("train", "valid", "test") for a in raw[s]],
        **{k: [refer.one_colour_share(a) for a in v] for k, v in ext_raw.items()},
    }
    shares_out = {
        k: [refer.one_colour_share(a) for a, kk in zip(od_raw, od_kinds) if kk == k]
        for k in NON_DERMOSCOPY
        if k != "tiny"
    }
    colour = {
        "ham10000": [refer.colourfulness(a) for s in ("train", "valid", "test") for a in raw[s]],
        **{k: [refer.colourfulness(a) for a in v] for k, v in ext_raw.items()},
    }
    colour_out = {
        k: [refer.colourfulness(a) for a, kk in zip(od_raw, od_kinds) if kk == k] for k in NON_DERMOSCOPY if k != "tiny"
    }
    colourfulness = {
        "cut_off": refer.MIN_COLOURFULNESS,
        "dermoscopy": {
            k: {
                "n": len(v),
                "min": float(np.min(v)),
                "p1": float(np.percentile(v, 1)),
                "median": float(np.median(v)),
                "below_cut_off": int(np.sum(np.asarray(v) < refer.MIN_COLOURFULNESS)),
            }
            for k, v in colour.items()
        },
        "non_dermoscopy": {
            k: {
                "n": len(v),
                "median": float(np.median(v)),
                "below_cut_off": float(np.mean(np.asarray(v) < refer.MIN_COLOURFULNESS)),
            }
            for k, v in colour_out.items()
            if v
        },
    }
    one_colour = {
        "cut_off": refer.ONE_COLOUR_SHARE,
        "dermoscopy": {
            k: {
                "n": len(v),
                "max": float(np.max(v)),
                "p99": float(np.percentile(v, 99)),
                "median": float(np.median(v)),
                "above_cut_off": int(np.sum(np.asarray(v) >= refer.ONE_COLOUR_SHARE)),
            }
            for k, v in shares.items()
        },
        "non_dermoscopy": {
            k: {
                "n": len(v),
                "median": float(np.median(v)),
                "above_cut_off": float(np.mean(np.asarray(v) >= refer.ONE_COLOUR_SHARE)),
            }
            for k, v in shares_out.items()
            if v
        },
    }

    methods: dict[str, Any] = {}
    for method in compared or refer.OOD_METHODS:
        t = time.perf_counter()
        stats = {} if as_served else refer.fit(method, out["train"][0][1], labels, len(pred.classes))
        fit_s = time.perf_counter() - t

        def s(outs: list[tuple[np.ndarray, np.ndarray]], method: str = method, stats: dict = stats) -> np.ndarray:
            if method == "disagreement":  # higher = more in distribution, as every score here
                return -member_disagreement([pred.calibrated(lo) for lo, _ in outs])
            if as_served:
                return pred.ood_scores(pred.served(outs)[0], None, members=outs)
            return refer.score(method, logits=outs[0][0], features=outs[0][1], stats=stats)

        valid_s, test_s = s(out["valid"]), s(out["test"])
        served_cut = (as_served or {}).get(method)
        thr = served_cut if served_cut is not None else refer.threshold(valid_s, keep=args.keep)
        od_s, art_s = s(od), s(art)
        # Scores of every non-dermoscopic image in od_raw order (tiny images: -inf, never scored).
        full = np.full(len(od_raw), -np.inf)
        full[od_pass] = od_s
        rule = np.array([c is not None or sc < thr for c, sc in zip(od_checks, full)])
        test_rule = np.array([c is not None or sc < thr for c, sc in zip(test_checks, test_s)])
        art_rule = np.array([c is not None or sc < thr for c, sc in zip(art_checks, art_s)])
        per_kind = {}
        passed = set(od_pass)
        for kind in NON_DERMOSCOPY:
            idx = [i for i, k in enumerate(od_kinds) if k == kind]
            if not idx:
                continue
            scored = [i for i in idx if i in passed]
            sk = full[scored]
            per_kind[kind] = {
                "n": len(idx),
                "auroc": float(roc_auc_score(np.r_[np.ones(len(test_s)), np.zeros(len(sk))], np.r_[test_s, sk]))
                if len(sk)
                else None,
                "referred_by_score": float(np.mean(sk < thr)) if len(sk) else None,
                "referred_by_rule": float(np.mean(rule[idx])),
            }
        per_art = {}
        for kind in sorted(set(art_kinds)):
            idx = [i for i, k in enumerate(art_kinds) if k == kind]
            per_art[kind] = {
                "n": len(idx),
                "auroc": float(
                    roc_auc_score(np.r_[np.ones(len(test_s)), np.zeros(len(idx))], np.r_[test_s, art_s[idx]])
                ),
                "referred_by_rule": float(np.mean(art_rule[idx])),
            }
        ext_res = {}
        for k, pair in ext.items():
            es = s(pair)
            er = np.array([c is not None or sc < thr for c, sc in zip(ext_checks[k], es)])
            ext_res[k] = {
                "n": len(es),
                "referred_by_score": float(np.mean(es < thr)),
                "referred_by_rule": float(np.mean(er)),
                "auroc_vs_ham_test": float(
                    roc_auc_score(np.r_[np.ones(len(test_s)), np.zeros(len(es))], np.r_[test_s, es])
                ),
            }
        top_test = pred.calibrated(pred.served(out["test"])[0]).max(axis=1)
        methods[method] = {
            "threshold": thr,
            "fit_seconds": fit_s,
            "stored_bytes": int(sum(np.asarray(v).nbytes for v in stats.values())),
            "ham_test_referred_by_score": float(np.mean(test_s < thr)),
            "ham_test_referred_by_rule": float(np.mean(test_rule)),
            "ham_test_referred_with_probability_floor": float(np.mean(test_rule | (top_test < pred.refer_below))),
            "non_dermoscopy_referred_by_rule": float(np.mean(rule)),
            "non_dermoscopy_auroc": float(
                roc_auc_score(np.r_[np.ones(len(test_s)), np.zeros(len(od_s))], np.r_[test_s, od_s])
            ),
            "by_kind": per_kind,
            "artefacts": per_art,
            "external": ext_res,
        }
    return {
        "keep": args.keep,
        "tta": "flips4" if tta else None,
        "networks": len(pred.networks),
        "fitted_on": "each member's training folds, when it was trained"
        if as_served
        else f"train split ({len(labels)} images)",
        "threshold_set_on": f"valid split ({len(ids['valid'])} images)",
        "n_test": len(ids["test"]),
        "non_dermoscopy_kinds": {k: od_kinds.count(k) for k in NON_DERMOSCOPY},
        "artefact_kinds": {k: art_kinds.count(k) for k in sorted(set(art_kinds))},
        "features": f"global average pool of {pred.feature_layer or 'the body output'}",
        "one_colour": one_colour,
        "colourfulness": colourfulness,
        "methods": methods,
    }


# ---- CAM comparison ---------------------------------------------------------------------------
def cam_part(pred: Predictor, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    data = Path(args.data)
    split = pd.read_csv(Path(args.model) / "split.csv")
    ids = [Path(p).stem for p in split.loc[split["split"] == "test", "image"].astype(str)]
    ids = [i for i in ids if (data / "masks" / f"{i}_segmentation.png").is_file()]
    rng = np.random.default_rng(0)
    ids = [ids[i] for i in rng.choice(len(ids), size=min(args.n_cam, len(ids)), replace=False)]
    model = pred.model.eval()
    body = model[0]
    blocks = body.model.blocks
    w, h = pred.input_size
    variants: dict[str, tuple[Callable, list]] = {
        "gradcam body (4x3)": (GradCAM, [body]),
        "gradcam blocks[4] (8x6)": (GradCAM, [blocks[4]]),
        "gradcam blocks[2] (16x12)": (GradCAM, [blocks[2]]),
        "gradcam body+blocks[4]": (GradCAM, [blocks[4], body]),
        "gradcam++ body": (GradCAMPlusPlus, [body]),
        "gradcam++ blocks[4]": (GradCAMPlusPlus, [blocks[4]]),
        "eigencam body": (EigenCAM, [body]),
        "eigencam blocks[4]": (EigenCAM, [blocks[4]]),
        "layercam blocks[4]": (LayerCAM, [blocks[4]]),
        "layercam blocks[2]+[4]+body": (LayerCAM, [blocks[2], blocks[4], body]),
    }
    yy, xx = np.mgrid[0:h, 0:w]
    centre = np.exp(-(((xx - (w - 1) / 2) / (w / 4)) ** 2 + ((yy - (h - 1) / 2) / (h / 4)) ** 2) / 2)
    scores: dict[str, dict[str, list]] = {k: {"pointing": [], "mass": []} for k in ["centre gaussian", *variants]}
    area = []
    images = [pred.preprocess(data / "images" / f"{i}.jpg") for i in ids]
    masks = [
        fit_to_size(Image.open(data / "masks" / f"{i}_segmentation.png").convert("RGB"), (w, h))[..., 0] > 127
        for i in ids
    ]
    predicted = pred.logits(images, tta=False).argmax(1)
    seconds = {k: 0.0 for k in variants}

    def score(name: str, heat: np.ndarray, mask: np.ndarray) -> None:
        total = float(heat.sum())
        scores[name]["pointing"].append(bool(mask.flat[int(np.argmax(heat))]))
        scores[name]["mass"].append(float(heat[mask].sum() / total) if total > 0 else float(mask.mean()))

    for image, mask, cls in zip(images, masks, predicted):
        if not mask.any():
            continue
        area.append(float(mask.mean()))
        score("centre gaussian", centre, mask)
        x = torch.from_numpy(pred._normalise([image]))
        for name, (kind, layers) in variants.items():
            t = time.perf_counter()
            with kind(model=model, target_layers=layers) as cam:
                heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(cls))])[0]
            seconds[name] += time.perf_counter() - t
            score(name, heat, mask)
    n = len(area)
    table = {
        k: {
            "pointing": float(np.mean(v["pointing"])),
            "mass_inside_lesion": float(np.mean(v["mass"])),
            "ms_per_image": 1000 * seconds[k] / n if k in seconds else None,
        }
        for k, v in scores.items()
    }
    return {
        "n": n,
        "lesion_area_share_mean": float(np.mean(area)),
        "target": "the predicted class",
        "note": "a uniform heatmap puts lesion_area_share of its mass inside the lesion",
        "variants": table,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "ham10000-effnet-lite0"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--part", nargs="+", default=["ood", "cam"], choices=["ood", "cam"])
    ap.add_argument("--keep", type=float, default=0.95, help="share of the valid split each score passes")
    ap.add_argument("--n-cam", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="results file name (default refer.json; e.g. refer_ensemble.json)")
    args = ap.parse_args()
    if args.quick:
        args.n_cam = 30
    pred = Predictor(args.model, backend="torch", threads=args.threads)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": str(Path(args.model).resolve().relative_to(ROOT)),
        "quick": args.quick,
    }
    out = RESULTS / (args.out or ("refer_quick.json" if args.quick else "refer.json"))
    if "ood" in args.part:
        r = result["ood"] = ood_part(pred, args)
        oc = r["one_colour"]
        print(
            f"one-colour share (cut-off {oc['cut_off']:.2f}): "
            + "; ".join(
                f"{k} max {v['max']:.2f}, p99 {v['p99']:.2f}, {v['above_cut_off']} above"
                for k, v in oc["dermoscopy"].items()
            )
        )
        cf = r["colourfulness"]
        print(
            f"colourfulness (cut-off {cf['cut_off']:.1f}): "
            + "; ".join(
                f"{k} min {v['min']:.1f}, p1 {v['p1']:.1f}, {v['below_cut_off']} below"
                for k, v in cf["dermoscopy"].items()
            )
        )
        first = next(iter(r["methods"].values()))
        kinds = list(first["by_kind"])
        print(
            f"\nreferred by the whole rule (input checks, then the score at keep {args.keep}), AUROC vs HAM test in brackets"
        )
        print(
            f"{'score':12} {'HAM test':>9} "
            + " ".join(f"{k[:12]:>14}" for k in kinds)
            + f" {'all non-derm':>13} "
            + " ".join(f"{k:>9}" for k in first["external"])
        )
        for m, v in r["methods"].items():
            cells = []
            for k in kinds:
                c = v["by_kind"][k]
                cells.append(
                    f"{c['referred_by_rule']:6.0%} ({c['auroc']:.2f})"
                    if c["auroc"] is not None
                    else f"{c['referred_by_rule']:>14.0%}"
                )
            print(
                f"{m:12} {v['ham_test_referred_by_rule']:9.1%} "
                + " ".join(f"{c:>14}" for c in cells)
                + f" {v['non_dermoscopy_referred_by_rule']:13.1%} "
                + " ".join(f"{e['referred_by_rule']:9.1%}" for e in v["external"].values())
            )
        print(
            "artefacts (referred by the rule): "
            + "; ".join(
                f"{m}: " + ", ".join(f"{k} {a['referred_by_rule']:.0%}" for k, a in v["artefacts"].items())
                for m, v in r["methods"].items()
            )
        )
    if "cam" in args.part:
        c = result["cam"] = cam_part(pred, args)
        print(f"\nCAM on {c['n']} HAM10000 test images with masks (lesion covers {c['lesion_area_share_mean']:.1%})")
        for k, v in c["variants"].items():
            ms = f"{v['ms_per_image']:.0f} ms" if v["ms_per_image"] is not None else ""
            print(f"{k:30} pointing {v['pointing']:.3f}  mass inside {v['mass_inside_lesion']:.3f}  {ms}")
    if out.is_file() and not args.quick:  # keep the other part's figures when only one part is re-run
        import json

        result = {**json.loads(out.read_text()), **result}
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
