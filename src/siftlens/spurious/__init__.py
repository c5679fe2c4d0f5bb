"""Spurious-correlation benchmarks and tools (planted cues, discovery, attention prompting)."""
