"""Frontal-face check for human subjects (paper: InsightFace keeps instances with valid frontal faces).

insightface is optional and not a dependency: `FaceAnalysis` downloads its model pack when the
folder is missing, so `InsightFaceDetector` refuses to construct unless the package imports AND
the model files are already on disk, and says what to install or where to point. With
`data.models.face: null` the curation stage skips the face check and records that it did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kaleido.vision import FaceDetector, ImageLike, to_rgb_array

__all__ = ["FaceDetector", "FaceModelUnavailable", "InsightFaceDetector", "frontal_score_from_keypoints"]


class FaceModelUnavailable(RuntimeError):
    """insightface or its local model pack is missing; the message says how to fix it."""


def frontal_score_from_keypoints(keypoints: np.ndarray, det_score: float) -> float:
    """Detection confidence x frontalness from the 5 landmarks (eyes, nose, mouth corners).

    A frontal face has its nose on the vertical line between the eye centres; as the head turns
    the nose moves towards one eye. frontalness = 1 - |nose offset| / (half the eye distance),
    clipped to [0, 1] (0 for a profile, where the nose reaches an eye).
    """
    kps = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    left_eye, right_eye, nose = kps[0], kps[1], kps[2]
    half_eyes = np.linalg.norm(right_eye - left_eye) / 2.0
    if half_eyes < 1e-6:
        return 0.0
    axis = (right_eye - left_eye) / (2.0 * half_eyes)
    offset = float(np.dot(nose - (left_eye + right_eye) / 2.0, axis))  # along the eye line
    frontalness = float(np.clip(1.0 - abs(offset) / half_eyes, 0.0, 1.0))
    return float(np.clip(det_score, 0.0, 1.0)) * frontalness


def _model_pack(root: Path, name: str) -> tuple[Path, str]:
    """(root for FaceAnalysis, pack name): accepts <root>/models/<name>/ or the pack folder itself."""
    if (root / "models" / name).is_dir():
        return root, name
    if root.parent.name == "models" and any(root.glob("*.onnx")):
        return root.parent.parent, root.name
    return root, name


class InsightFaceDetector:
    """insightface `FaceAnalysis` (detection + landmarks) from a local model pack (e.g. buffalo_l)."""

    name = "insightface"

    def __init__(
        self, root: str | Path, model_name: str = "buffalo_l", det_size: int = 640, device: str = "cpu"
    ) -> None:
        root = Path(root)
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise FaceModelUnavailable(
                f"data.models.face is set to {root} but insightface is not importable ({exc}). Install it with "
                "`pip install insightface onnxruntime` (onnxruntime-gpu on a GPU machine), or set "
                "data.models.face: null to skip the frontal-face check for humans"
            ) from None
        pack_root, pack = _model_pack(root, model_name)
        pack_dir = pack_root / "models" / pack
        if not any(pack_dir.glob("*.onnx")):
            # checked here because FaceAnalysis would otherwise try to download the pack
            raise FaceModelUnavailable(
                f"insightface model pack not found: no .onnx files in {pack_dir}. Copy the '{pack}' pack "
                f"(det_10g.onnx, ...) there, point data.models.face at its parent root, or set "
                "data.models.face: null to skip the face check"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        self.app: Any = FaceAnalysis(
            name=pack, root=str(pack_root), allowed_modules=["detection"], providers=providers
        )
        self.app.prepare(ctx_id=0 if device.startswith("cuda") else -1, det_size=(det_size, det_size))

    def frontal_face_score(self, image: ImageLike) -> float | None:
        bgr = to_rgb_array(image)[:, :, ::-1].copy()  # insightface expects OpenCV's BGR order
        faces = self.app.get(bgr)
        if not faces:
            return None
        scores = [
            frontal_score_from_keypoints(face.kps, float(face.det_score)) if getattr(face, "kps", None) is not None
            else float(face.det_score)
            for face in faces
        ]
        return max(scores)
