"""Peak memory of `siftlens spurious` (the library entry the CLI uses, `run_spurious`) at N and 10 N images.

    nice -n 10 python benchmarks/bench_spurious_memory.py --images 64,640
    nice -n 10 python benchmarks/bench_spurious_memory.py --images 64,640 --code OLD/src   # another checkout
    ... --keep DIR   # keep the runs (DIR/out_N) to compare two checkouts' outputs

Images: the bundled ones (src/siftlens/bundled/images) cycled by symlinks into an ImageFolder of two classes
(``a`` and ``b``, N / 2 images each); model: the bundled ``vit_tiny_imagenette`` (128 px). Each run is a fresh
subprocess (OMP_NUM_THREADS=1) that prints its high-water RSS (VmHWM, Linux) at the end and the RSS after its
imports, so the difference is the run's own peak; the growth per image is the slope between the two largest N.
The run's settings are the CLI's defaults except ``--causal-images`` (8 per class: the causal forwards cost the
same at every N and are not what grows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "siftlens" / "bundled" / "images"

CHILD = r"""
import json, sys, time
from siftlens.spurious.causal import CausalConfig
from siftlens.spurious.discover import DiscoveryConfig
from siftlens.spurious.run import run_spurious
import siftlens.spurious.run as run_module

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024

base = status("VmRSS")
t = time.perf_counter()
cfg = DiscoveryConfig(causal=CausalConfig(causal_images=int(sys.argv[3])))
res = run_spurious("bundled:vit_tiny_imagenette", sys.argv[1], sys.argv[2], cfg=cfg)
print(json.dumps({"peak_rss_mib": round(status("VmHWM"), 1), "after_import_mib": round(base, 1),
                  "run_mib": round(status("VmHWM") - base, 1), "seconds": round(time.perf_counter() - t, 1),
                  "n_keypoints": int(len(res.keypoints)), "siftlens": run_module.__file__}))
"""


def image_folder(dst: Path, n_images: int) -> Path:
    """An ImageFolder of two classes, n_images symlinks to the bundled images, cycled."""
    files = sorted(p for p in BUNDLED.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for i in range(n_images):
        cls = dst / ("a" if i % 2 == 0 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        src = files[i % len(files)]
        (cls / f"{i:06d}{src.suffix}").symlink_to(src)
    return dst


def measure(n_images: int, work: Path, code: str | None, causal_images: int) -> dict:
    images = image_folder(work / f"images_{n_images}", n_images)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if code:
        env["PYTHONPATH"] = code
    out = subprocess.run([sys.executable, "-c", CHILD, str(images), str(work / f"out_{n_images}"),
                          str(causal_images)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"spurious on {n_images} images failed:\n{out.stderr[-3000:]}")
    return {"n_images": n_images, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="64,640", help="comma-separated image counts")
    ap.add_argument("--code", default=None, help="a siftlens src directory to measure instead of the installed one")
    ap.add_argument("--causal-images", type=int, default=8)
    ap.add_argument("--keep", default=None, help="keep the images and runs here (out_N: compare two checkouts)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for n in sorted(int(s) for s in args.images.split(",")):
            rows.append(measure(n, work, args.code, args.causal_images))
            print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        a, b = rows[-2], rows[-1]
        per_image = (b["run_mib"] - a["run_mib"]) * 1024 / (b["n_images"] - a["n_images"])
        per_kp = (b["run_mib"] - a["run_mib"]) * 1024 ** 2 / max(b["n_keypoints"] - a["n_keypoints"], 1)
        print(f"growth {a['n_images']} -> {b['n_images']} images: {b['run_mib'] - a['run_mib']:+.1f} MiB, "
              f"{per_image:.1f} KiB per image ({per_kp:.0f} B per keypoint; "
              f"{b['n_keypoints'] / b['n_images']:.0f} keypoints per image)")


if __name__ == "__main__":
    main()
