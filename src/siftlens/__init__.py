"""siftlens: what ViT self-attention looks at, measured against SIFT semantic maps."""

__version__ = "0.1.0"
