"""siftlens: what ViT self-attention looks at, measured against SIFT semantic maps."""

__version__ = "0.1.0"

from .analyze import AnalysisResult, AnalyzeConfig, analyze  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .semantic_maps import MapConfig, compute_maps  # noqa: E402

__all__ = ["analyze", "AnalyzeConfig", "AnalysisResult", "load_model", "LoadedModel", "MapConfig", "compute_maps"]
