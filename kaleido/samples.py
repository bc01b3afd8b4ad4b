"""Real sample media that ship inside registry packages (no downloads).

scikit-image bundles photographs in its wheel: astronaut (a person), chelsea (a cat), coffee (an object),
rocket (an object). They are the reference images of the embedded default and of the tests.
"""

from __future__ import annotations

from pathlib import Path

from kaleido.platform.files import atomic_path

SAMPLE_IMAGES = {
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
}


def export_sample_images(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Write the scikit-image sample photographs as PNG files; returns their paths (existing files are kept)."""
    import skimage.data
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(SAMPLE_IMAGES):
        if name not in SAMPLE_IMAGES:
            raise ValueError(f"unknown sample image {name!r}; available: {', '.join(SAMPLE_IMAGES)}")
        path = out_dir / f"{name}.png"
        if not path.exists():
            pixels = getattr(skimage.data, SAMPLE_IMAGES[name])()
            with atomic_path(path) as tmp:  # two commands asking at once never see half a PNG
                Image.fromarray(pixels).convert("RGB").save(tmp)
        paths.append(path)
    return paths
