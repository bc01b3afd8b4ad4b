"""Evaluation: VBench's five video-quality metrics, text alignment, the paper's S2V metrics, the gate.

- `metrics`: metric names and the pure formulas (known-answer tested), aggregation, bootstrap
- `vbench`: DINO / CLIP / LAION aesthetic / MUSIQ backbones with VBench's preprocessing; ViCLIP or
  the labelled CLIP image-text fallback
- `interpolation`: frame interpolators for motion smoothness (Farneback, TorchScript AMT-S)
- `s2v`: S2V Consistency and Decoupling (Grounding DINO + SAM + CLIP, or any Detector/Segmenter/embedder)
- `evalset`: the eval-set folder format, its validator and the built-in set
- `run`: `kaleido evaluate` (generate, score, resume, metrics.json, MLflow); `report`: the HTML report
- `gate`: `kaleido gate` (floors + bootstrap regression check against the champion)
- `tiny`: random-weight metric backbones in their real formats, for tests and the embedded default
Heavy libraries load inside the functions that need them, so importing this package is cheap.
"""

from kaleido.eval.metrics import METRICS, MetricInfo

__all__ = ["METRICS", "MetricInfo"]
