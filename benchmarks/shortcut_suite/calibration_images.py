"""Clean calibration images for the shortcut claim: a seeded, class-balanced sample of Imagenette's val split,
copied byte for byte (no cue planted) into an ImageFolder tree that `siftlens spurious --images` reads.

    python benchmarks/shortcut_suite/calibration_images.py --data ../shared/data/imagenette2-160.tar \
        --per-class 20 --seed 0 --out runs/calibration/A20

A claim made on these images by a random-weights model (`--random-init`) is a false positive by construction;
the same images with the trained bundled model say how often the claim fires on data with no planted cue.
Same arguments -> the same files.
"""

from __future__ import annotations

import argparse
import os
import tarfile
from pathlib import Path

from siftlens.image_source import list_tar_image_folder, select_per_class


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="imagenette2-160.tar (or any ImageFolder tar with a val split)")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="val")
    ap.add_argument("--classes", nargs="*", help="class folder names (default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    if out.exists():
        print(f"{out} exists; nothing to do")
        return
    with tarfile.open(args.data) as tar:
        files = list_tar_image_folder(tar, Path(args.data), args.split)
        try:  # the seeded per-class draw load_image_folder makes
            _, picked = select_per_class(files, args.classes or None, args.per_class, args.seed, {})
        except ValueError as e:
            raise SystemExit(f"--classes / --per-class: {e}") from None
        for cls, members in picked.items():
            (tmp / cls).mkdir(parents=True, exist_ok=True)
            for m in members:
                (tmp / cls / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    os.replace(tmp, out)
    print(f"{sum(1 for _ in out.rglob('*.*'))} images in {len(picked)} classes -> {out}")


if __name__ == "__main__":
    main()
