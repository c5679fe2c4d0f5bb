"""Command-line options shared by the reducer microbenchmarks: the attention shapes of a model and the rounds."""

from __future__ import annotations

import argparse


def attention_shape_parser(description: str) -> argparse.ArgumentParser:
    """--batch/--heads/--grid/--layers (ViT-S/16 at batch 32 by default), --rounds, --threads."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--grid", type=int, default=14, help="patches per side")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are printed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (analyze's statistics thread with 2 workers)")
    return ap
