"""Agreement of the kornia SIFT detector (`--keypoint-detector kornia`) with OpenCV's SIFT, in one run.

    python benchmarks/bench_keypoint_detectors.py --images imagenette2-160/val --n 200
    python benchmarks/bench_keypoint_detectors.py --images DIR --n 200 --size 224 --no-analyze

On N images (evenly spaced over the sorted folder), preprocessed like the bundled model (128 px) or
resized + centre-cropped to --size (ImageNet crop 0.875), the same 8-bit grey image goes to both
detectors. Prints:
  keypoints per image of each detector;
  repeatability: fraction of OpenCV keypoints with a kornia keypoint within 2 px and diameter ratio in
    [0.5, 2], and the reverse (mean over images, and pooled over keypoints);
  geometry of matched keypoints (nearest within 1 px): mean offset kornia - OpenCV, geometric-mean
    size ratio OpenCV / kornia (what fixes keypoints_kornia.SIZE_FACTOR), response ratio;
  Pearson and Spearman correlation of the per-patch SIFT concentration maps (footprint, patch 16);
  effect on the analysis (unless --no-analyze; bundled model at its own 128 px input): `analyze` with
    both detectors on the same images, per layer the mean head-averaged S_cls for the sift map (and the
    two keypoint-derived baselines) and kornia - OpenCV with a paired 95% bootstrap CI;
  detector speed in images/s on --device (default cpu) with torch/OpenCV threads as given.
Exits 0 with a message when the image folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree
from scipy.stats import pearsonr, spearmanr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True,
                    help="image folder, e.g. imagenette2-160/val extracted from ../shared/data/imagenette2-160.tar")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=None, help="square input size (default: the bundled model's)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32, help="images per kornia call")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads")
    ap.add_argument("--no-analyze", action="store_true", help="skip the two `analyze` runs")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    if not Path(args.images).is_dir():
        print(f"skipped: image folder {args.images} not found")
        return 0
    try:
        from siftlens.keypoints_kornia import KORNIA_VERSION, SIZE_FACTOR, detect_sift_kornia, repeatability
    except ImportError as e:
        print(f"skipped: {e}")
        return 0
    import cv2

    from siftlens.analyze import analyze
    from siftlens.compare import difference_by_layer
    from siftlens.dataset_stats import layer_curve
    from siftlens.image_source import find_images
    from siftlens.models import load_model
    from siftlens.preprocess import Preprocess, load_rgb
    from siftlens.semantic_maps import SiftParams, concentration, detect_sift, keypoint_mass

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    all_paths = find_images(args.images)
    paths = [all_paths[i] for i in np.unique(np.linspace(0, len(all_paths) - 1, args.n).astype(int))]
    bundled = load_model("vit_tiny_imagenette")
    pre = bundled.preprocess if args.size is None else Preprocess(input_size=(args.size, args.size))
    H, W = pre.input_size
    grays = [pre.to_uint8_gray(pre(load_rgb(p))) for p in paths]
    params = SiftParams()
    res: dict = {"n_images": len(paths), "input": [H, W], "images": args.images, "kornia": KORNIA_VERSION,
                 "opencv": cv2.__version__, "torch": torch.__version__, "device": args.device,
                 "threads": args.threads, "cpu_count": os.cpu_count(),
                 "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                 "cuda_available": torch.cuda.is_available()}
    print(f"{len(paths)} images from {args.images}, input {H}x{W}, kornia {KORNIA_VERSION}, OpenCV {cv2.__version__}, "
          f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"CUDA available: {torch.cuda.is_available()}")

    # --- detection and speed (same 8-bit grey image for both) ---
    detect_sift(grays[0], params)  # warm-up
    t0 = time.perf_counter()
    cv = [detect_sift(g, params) for g in grays]
    t_cv = time.perf_counter() - t0
    batch = torch.from_numpy(np.stack(grays)).float().div_(255.0).unsqueeze(1)
    detect_sift_kornia(batch[:2].to(args.device), params)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ko = []
    for s in range(0, len(batch), args.batch_size):
        ko += detect_sift_kornia(batch[s: s + args.batch_size].to(args.device), params)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ko = time.perf_counter() - t0
    res["speed_img_s"] = {"opencv": len(paths) / t_cv, "kornia": len(paths) / t_ko}
    n_cv, n_ko = np.array([len(k) for k in cv]), np.array([len(k) for k in ko])
    res["keypoints_per_image"] = {"opencv": float(n_cv.mean()), "kornia": float(n_ko.mean()),
                                  "opencv_median": float(np.median(n_cv)), "kornia_median": float(np.median(n_ko)),
                                  "images_without_keypoints": {"opencv": int((n_cv == 0).sum()),
                                                               "kornia": int((n_ko == 0).sum())}}

    # --- repeatability ---
    rep_cv = [repeatability(a, b) for a, b in zip(cv, ko)]
    rep_ko = [repeatability(b, a) for a, b in zip(cv, ko)]
    res["repeatability"] = {
        "opencv_found_by_kornia": {"mean_over_images": float(np.mean([r.mean() for r in rep_cv if len(r)])),
                                   "pooled": float(np.concatenate(rep_cv).mean())},
        "kornia_found_by_opencv": {"mean_over_images": float(np.mean([r.mean() for r in rep_ko if len(r)])),
                                   "pooled": float(np.concatenate(rep_ko).mean())},
        "criterion": "within 2 px, diameter ratio in [0.5, 2]"}

    # --- geometry of matched keypoints: nearest kornia keypoint within 1 px ---
    off, size_r, resp_r = [], [], []
    for a, b in zip(cv, ko):
        if len(a) and len(b):
            d, j = cKDTree(b.xy).query(a.xy)
            m = d < 1.0
            off.append(b.xy[j[m]] - a.xy[m])
            size_r.append(np.log(a.size[m] / b.size[j[m]]))
            resp_r.append(np.log(a.response[m] / b.response[j[m]]))
    off, size_r, resp_r = np.concatenate(off), np.concatenate(size_r), np.concatenate(resp_r)
    res["matched_geometry"] = {"pairs": len(off), "mean_offset_xy_kornia_minus_opencv": off.mean(0).tolist(),
                               "size_ratio_opencv_over_kornia_geomean": float(np.exp(size_r.mean())),
                               "size_ratio_p5_p95": np.exp(np.quantile(size_r, [0.05, 0.95])).tolist(),
                               "response_ratio_opencv_over_kornia_geomean": float(np.exp(resp_r.mean())),
                               "size_factor_used": SIZE_FACTOR}

    # --- concentration maps ---
    grid = (H // args.patch, W // args.patch)
    pear, spear, both_none, one_none = [], [], 0, 0
    for a, b in zip(cv, ko):
        ca = concentration(keypoint_mass(a, grid, args.patch, "footprint", "response"))
        cb = concentration(keypoint_mass(b, grid, args.patch, "footprint", "response"))
        if ca is None or cb is None:
            both_none += ca is None and cb is None
            one_none += (ca is None) != (cb is None)
            continue
        if ca.std() > 0 and cb.std() > 0:
            pear.append(pearsonr(ca, cb)[0])
            spear.append(spearmanr(ca, cb)[0])
    res["maps"] = {"grid": list(grid), "mode": "footprint, response weights", "images": len(pear),
                   "pearson_mean": float(np.mean(pear)), "pearson_median": float(np.median(pear)),
                   "pearson_p10": float(np.quantile(pear, 0.1)),
                   "spearman_mean": float(np.mean(spear)), "spearman_median": float(np.median(spear)),
                   "no_map_both": int(both_none), "no_map_one_detector_only": int(one_none)}

    _print_detection(res)

    # --- effect on the analysis ---
    if not args.no_analyze:
        tmp = Path(tempfile.mkdtemp(prefix="siftlens-kpbench-"))
        runs, tables = {}, {}
        for det in ("opencv", "kornia"):
            t0 = time.perf_counter()
            r = analyze(bundled, paths, tmp / det, keypoint_detector=det, device=args.device, workers=1,
                        batch_size=args.batch_size, null_permutations=0, report=False, progress=False, examples=0)
            runs[det] = {"seconds": time.perf_counter() - t0, "analysed": r.manifest["counts"]["analysed"],
                         "no_keypoints": r.manifest["counts"]["no_keypoints"]}
            tables[det] = r.per_image.merge(r.images[["image_id", "path"]], on="image_id")
        res["analyze"] = {"model": "vit_tiny_imagenette (bundled)", "input": list(bundled.preprocess.input_size),
                          "runs": runs, "columns": {}}
        for col in ("s_cls__sift", "s_cls__random_kp", "s_cls__edges_sparse"):
            curves = {det: layer_curve(tables[det], col, args.n_boot) for det in tables}
            diff, paired = difference_by_layer(tables["opencv"], tables["kornia"], col, args.n_boot)
            res["analyze"]["columns"][col] = {
                "paired": paired,
                "layers": [{"layer": int(layer), "opencv": float(curves["opencv"]["mean"].iloc[k]),
                            "kornia": float(curves["kornia"]["mean"].iloc[k]),
                            "diff": float(diff["diff"].iloc[k]), "lo": float(diff["lo"].iloc[k]),
                            "hi": float(diff["hi"].iloc[k])}
                           for k, layer in enumerate(diff["layer"])]}
        _print_analysis(res)
    print("\nSpeed (images/s of keypoint detection alone, same images): "
          f"OpenCV {res['speed_img_s']['opencv']:.1f} (one image at a time), kornia {res['speed_img_s']['kornia']:.1f} "
          f"(batches of {args.batch_size}) on {args.device}, {args.threads} thread(s).")
    if not args.device.startswith("cuda"):
        print("NOTE: no GPU was used in this run, so GPU speed is NOT measured; kornia on a CPU is only a reference.")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))
    return 0


def _print_detection(res: dict) -> None:
    k, r, g, m = res["keypoints_per_image"], res["repeatability"], res["matched_geometry"], res["maps"]
    print(f"\nKeypoints per image: OpenCV {k['opencv']:.1f} (median {k['opencv_median']:.0f}), "
          f"kornia {k['kornia']:.1f} (median {k['kornia_median']:.0f}); images without keypoints: "
          f"{k['images_without_keypoints']}")
    a, b = r["opencv_found_by_kornia"], r["kornia_found_by_opencv"]
    print(f"Repeatability ({r['criterion']}): OpenCV keypoints found by kornia {a['mean_over_images']:.3f} "
          f"(pooled {a['pooled']:.3f}); kornia keypoints found by OpenCV {b['mean_over_images']:.3f} "
          f"(pooled {b['pooled']:.3f})")
    print(f"Matched pairs (nearest within 1 px): {g['pairs']}; mean offset kornia - OpenCV "
          f"({g['mean_offset_xy_kornia_minus_opencv'][0]:+.3f}, {g['mean_offset_xy_kornia_minus_opencv'][1]:+.3f}) px; "
          f"size ratio OpenCV/kornia geo-mean {g['size_ratio_opencv_over_kornia_geomean']:.4f} "
          f"(5-95%: {g['size_ratio_p5_p95'][0]:.3f}-{g['size_ratio_p5_p95'][1]:.3f}) with SIZE_FACTOR "
          f"{g['size_factor_used']}; response ratio geo-mean {g['response_ratio_opencv_over_kornia_geomean']:.4f}")
    print(f"Concentration maps ({m['mode']}, grid {m['grid'][0]}x{m['grid'][1]}, {m['images']} images): Pearson mean "
          f"{m['pearson_mean']:.3f} (median {m['pearson_median']:.3f}, 10th pct {m['pearson_p10']:.3f}); Spearman mean "
          f"{m['spearman_mean']:.3f} (median {m['spearman_median']:.3f}); no map: both {m['no_map_both']}, "
          f"one detector only {m['no_map_one_detector_only']}")


def _print_analysis(res: dict) -> None:
    a = res["analyze"]
    print(f"\nEffect on `analyze` ({a['model']}, input {a['input'][0]}x{a['input'][1]}, same images; "
          + ", ".join(f"{d}: {v['analysed']} analysed, {v['no_keypoints']} without keypoints, {v['seconds']:.1f} s"
                      for d, v in a["runs"].items()) + ")")
    for col, v in a["columns"].items():
        print(f"  {col}: per layer, mean over images of the head-averaged value; kornia - OpenCV "
              f"({'paired' if v['paired'] else 'unpaired'} bootstrap 95% CI)")
        rows = pd.DataFrame(v["layers"])
        rows["diff [95% CI]"] = [f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, lo, hi in
                                 zip(rows["diff"], rows["lo"], rows["hi"])]
        print(rows[["layer", "opencv", "kornia", "diff [95% CI]"]].to_string(index=False,
                                                                              float_format=lambda x: f"{x:.4f}"))


if __name__ == "__main__":
    sys.exit(main())
