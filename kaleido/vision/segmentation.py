"""Box-prompted segmentation with SAM (`segment-anything`), loaded from a local .pth checkpoint.

`sam_type` picks the image encoder size: vit_b / vit_l / vit_h are the released checkpoints
(sam_vit_b_01ec64.pth ...); "tiny" is a 64-wide, 2-block encoder used for random-weight tests. All
of them load through segment_anything's own builder (`torch.load` of a plain state dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.vision import Box, ImageLike, clip_box, resolve_device, to_rgb_array

# Encoder dims of the tiny random-weight SAM (kaleido.vision.tiny); prompt encoder and mask decoder
# keep their released sizes, so the tiny checkpoint exercises the real decoding path.
TINY_SAM = {"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2, "encoder_global_attn_indexes": [1]}
SAM_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")


def build_sam(sam_type: str, checkpoint: str | Path | None = None) -> Any:
    """A segment_anything `Sam` of `sam_type`, with `checkpoint` loaded when given."""
    from segment_anything import sam_model_registry
    from segment_anything.build_sam import _build_sam

    if sam_type not in SAM_TYPES:
        raise ValueError(f"sam_type {sam_type!r}: expected one of {', '.join(SAM_TYPES)}")
    path = None if checkpoint is None else str(checkpoint)
    if sam_type == "tiny":
        return _build_sam(**TINY_SAM, checkpoint=path)
    return sam_model_registry[sam_type](checkpoint=path)


class SamSegmenter:
    """`segment(image, boxes) -> bool masks [N, H, W]` (one mask per box, SAM's single-mask output)."""

    name = "sam"

    def __init__(self, sam: Any, device: str = "cpu") -> None:
        from segment_anything import SamPredictor

        self.device = device
        self.predictor = SamPredictor(sam.to(device).eval())
        self.last_scores: np.ndarray = np.zeros(0, dtype=np.float32)  # SAM's IoU estimate per mask

    @classmethod
    def from_checkpoint(cls, path: str | Path, sam_type: str = "vit_b", device: str | None = None) -> SamSegmenter:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"SAM checkpoint {path}: file not found; point data.models.sam at a local segment-anything "
                f"checkpoint (.pth, e.g. sam_vit_b_01ec64.pth) and set data.models.sam_type to match"
            )
        try:
            sam = build_sam(sam_type, path)
        except RuntimeError as exc:  # a state dict of another size: name the knob that fixes it
            raise ValueError(
                f"SAM checkpoint {path} does not match data.models.sam_type={sam_type!r}: {str(exc)[:300]}"
            ) from None
        return cls(sam, resolve_device(device))

    def segment(self, image: ImageLike, boxes: Sequence[Box]) -> np.ndarray:
        import torch

        array = to_rgb_array(image)
        height, width = array.shape[:2]
        if len(boxes) == 0:
            self.last_scores = np.zeros(0, dtype=np.float32)
            return np.zeros((0, height, width), dtype=bool)
        self.predictor.set_image(array, image_format="RGB")
        box_tensor = torch.tensor([clip_box(b, height, width) for b in boxes], dtype=torch.float32, device=self.device)
        box_tensor = self.predictor.transform.apply_boxes_torch(box_tensor, (height, width))
        with torch.inference_mode():
            masks, scores, _ = self.predictor.predict_torch(
                point_coords=None, point_labels=None, boxes=box_tensor, multimask_output=False
            )
        self.predictor.reset_image()
        self.last_scores = scores[:, 0].float().cpu().numpy()
        return masks[:, 0].cpu().numpy().astype(bool)
