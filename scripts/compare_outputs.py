"""Are two output folders the same numbers? For refactors: run the same commands with the old and the new code
and compare every table, array and JSON file exactly (run times, versions and the folder's own path aside) and
every HTML page's embedded figures (their text may change).

    # old code: a copy of main's src/ (git archive main src | tar -x -C old)
    PYTHONPATH=old/src python -m siftlens spurious --images DATA --out a/spurious ...
    python -m siftlens spurious --images DATA --out b/spurious ...
    python scripts/compare_outputs.py a b

Exit status 1 when a table, array or JSON file differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

VOLATILE = ("seconds", "versions", "git_revision", "started", "finished", "timings")


def _json(path: Path, root: Path) -> str:
    obj = json.loads(path.read_text())
    if isinstance(obj, dict):
        for k in VOLATILE:
            obj.pop(k, None)
    return json.dumps(obj, sort_keys=True).replace(str(root), "<out>")


def same_file(fa: Path, fb: Path, a: Path, b: Path) -> bool:
    if fa.suffix == ".parquet":
        try:
            pd.testing.assert_frame_equal(pd.read_parquet(fa), pd.read_parquet(fb), check_exact=True)
            return True
        except AssertionError:
            return False
    if fa.suffix == ".npz":
        with np.load(fa) as za, np.load(fb) as zb:
            return set(za.files) == set(zb.files) and all(
                np.array_equal(za[k], zb[k], equal_nan=za[k].dtype.kind in "fc") for k in za.files)
    if fa.suffix == ".json":
        return _json(fa, a) == _json(fb, b)
    if fa.suffix == ".html":
        pngs = [re.findall(r"base64,([A-Za-z0-9+/=]+)", f.read_text()) for f in (fa, fb)]
        return pngs[0] == pngs[1]
    return fa.read_bytes().replace(str(a).encode(), b"") == fb.read_bytes().replace(str(b).encode(), b"")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    bad = 0
    for rel in sorted(p.relative_to(args.a) for p in args.a.rglob("*") if p.is_file()):
        fa, fb = args.a / rel, args.b / rel
        ok = fb.is_file() and same_file(fa, fb, args.a, args.b)
        bad += not ok
        print(f"{'same' if ok else 'DIFFERS'}  {rel}" + ("  (embedded figures)" if rel.suffix == ".html" else ""))
    print(f"{bad} file(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
