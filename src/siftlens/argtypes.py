"""argparse types that check a number against its meaningful range at parse time.

Each type carries ``range_text`` (e.g. "2..64", ">= 0"); ``add_ranges_to_help`` appends it to the
option's help, so ``--help`` states every range that is enforced.
"""

from __future__ import annotations

import argparse
import math

# Ranges with a reason beyond "must be positive" (docs/CHOICES.md, "Arguments"):
MAX_GROUPS = 16  # G x G lift columns per row of per_image.parquet; finer bins hold a handful of patches
MAX_SIDE = 1024  # attention memory grows with (H*W / p^2)^2: 1024 px at p = 16 is 4096 tokens, 800 MB per layer
MAX_PERMUTATIONS = 10_000  # p-values resolved to 1e-4; memory of the null grows linearly in K
MAX_EXAMPLES = 64  # images drawn in the report's example figure
MAX_FULL_MAPS = 256  # [layers, heads, T, T] float16 each: ~11 MB per image for ViT-B/16 at 224 px


class _Number:
    """A callable argparse type: parse ``kind`` and check lo <= v <= hi (or lo < v with open_lo)."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None,
                 open_lo: bool = False, open_hi: bool = False) -> None:
        self.kind, self.lo, self.hi, self.open_lo, self.open_hi = kind, lo, hi, open_lo, open_hi
        self.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message

    @property
    def range_text(self) -> str:
        lo, hi = (v if v is None or isinstance(v, int) else f"{v:g}" for v in (self.lo, self.hi))
        if lo is not None and hi is not None:
            if not self.open_lo and not self.open_hi:
                return f"{lo}..{hi}"
            return f"{'(' if self.open_lo else '['}{lo}, {hi}{')' if self.open_hi else ']'}"
        if lo is not None:
            return f"{'>' if self.open_lo else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.open_hi else '<='} {hi}"
        return "finite"

    def __call__(self, text: str):
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}") \
                from None
        if self.kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number ({self.range_text})")
        too_low = self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo)
        too_high = self.hi is not None and (v >= self.hi if self.open_hi else v > self.hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {self.range_text})")
        return v


def int_range(lo: int | None = None, hi: int | None = None) -> _Number:
    """An integer in lo..hi (either end open-ended when None)."""
    return _Number(int, lo, hi)


def int_at_least(lo: int) -> _Number:
    return _Number(int, lo)


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
SEED = int_range(0, 2**32 - 1)  # numpy's SeedSequence and OpenCV take unsigned 32-bit seeds
N_WORDS = int_range(2, 4096)  # `spurious --words`: k-means needs two clusters; more than 4096 words rarely recur
DENSE_WORDS = int_range(0, 4096)  # `spurious --dense-words`: 0 = none


def float_range(lo: float | None = None, hi: float | None = None, open_lo: bool = False,
                open_hi: bool = False) -> _Number:
    """A finite float in [lo, hi] (open ends with open_lo / open_hi)."""
    return _Number(float, lo, hi, open_lo, open_hi)


finite_float = float_range()
positive_float = float_range(0.0, open_lo=True)
non_negative_float = float_range(0.0)


def check_ranges(values: dict[str, object], types: dict[str, _Number]) -> None:
    """The same checks for library callers: raise UserValueError naming the option (``--flag-name``)."""
    from .validation import UserValueError

    for name, t in types.items():
        v = values.get(name)
        if v is None:
            continue
        try:
            t(str(v))
        except argparse.ArgumentTypeError as e:
            raise UserValueError(f"--{name.replace('_', '-')}: {e}") from None


def analyze_option_types() -> dict[str, _Number]:
    """The range of every numeric AnalyzeConfig field (the CLI uses the same types)."""
    return {"groups": int_range(2, MAX_GROUPS), "batch_size": positive_int, "workers": int_range(0, 64),
            "limit": positive_int, "seed": SEED, "null_permutations": int_range(0, MAX_PERMUTATIONS),
            "examples": int_range(0, MAX_EXAMPLES), "keep_full_maps": int_range(0, MAX_FULL_MAPS),
            "twin_images": positive_int}


def discovery_option_types() -> dict[str, _Number]:
    """The range of every numeric DiscoveryConfig field that `spurious` exposes (the CLI uses the same types)."""
    return {"n_words": N_WORDS, "colour_weight": non_negative_float, "orientation_weight": non_negative_float,
            "batch_size": positive_int, "seed": SEED, "dense_words": DENSE_WORDS,
            "dense_gradient_weight": non_negative_float}


def add_ranges_to_help(parser: argparse.ArgumentParser) -> None:
    """Append each checked option's range to its help text (recursively through subcommands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                add_ranges_to_help(sub)
        elif isinstance(action.type, _Number) and action.help != argparse.SUPPRESS:
            note = f"range {action.type.range_text}"
            action.help = f"{action.help}; {note}" if action.help else note


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors in one line (the usage of `analyze` is a screenful): '<prog>: error: ...'."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
