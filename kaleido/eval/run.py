"""`kaleido evaluate`: generate every eval case with the S2V pipeline, score it, report, log to MLflow.

Output folder:
  cases/<id>/video.mp4, sheet.png (every frame), strip.png (8 frames, embedded in the report),
  cases/<id>/result.json   written last: its presence (with a matching key) marks the case done
  metrics.json             every case's scores, means per category and overall, backbones, settings
  summary.json             the overall and per-category means only (DVC metrics: `dvc exp show` columns)
  cases.csv                one row per case (id, category, every metric): DVC's per-case plot
  report.html              references, frame strips, scores, backbones, the gate rule
A re-run skips the cases whose result.json carries the same key (case content + model + settings +
backbones), so an interrupted evaluation resumes where it stopped.

One evaluation at a time per output folder (an exclusive lock held for the run; a second one is refused naming
the first). Every file above is written under a temporary name and renamed: whole or absent. metrics.json and the
report are written before any MLflow request; an MLflow outage then ends the run with EvalNotLogged (the results
are complete, a re-run only logs), and `mlflow_run.json` names the run so that the next evaluation into the folder
marks it FAILED if an outage left it RUNNING (docs/operations.md, "When things fail").
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kaleido.eval.evalset import EvalCase, EvalSet, load_eval_set
from kaleido.eval.metrics import METRICS, aggregate
from kaleido.platform.files import atomic_path, exclusive_output, write_json_atomic, write_text_atomic
from kaleido.serving import model_weights
from kaleido.train.tracking import (
    RUN_RECORD,
    TrackingUnavailable,
    call_tracking,
    mark_left_behind,
    mlflow_request_limits,
)

if TYPE_CHECKING:
    from kaleido.config import Params

SCHEMA_VERSION = 1
STRIP_FRAMES = 8
STRIP_HEIGHT = 96
SHEET_HEIGHT = 240


class EvalError(RuntimeError):
    """The evaluation cannot run as asked; the message says what to change."""


class EvalNotLogged(EvalError):
    """The MLflow server stopped answering: the evaluation is complete on disk (`summary`), not logged."""

    def __init__(self, message: str, summary: EvalSummary):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class EvalSettings:
    """Generation settings every case of one evaluation shares."""

    frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    shift: float
    sampler: str
    fps: int
    negative_prompt: str

    @classmethod
    def from_params(cls, params: Params) -> EvalSettings:
        g, e = params.generate, params.eval
        return cls(
            frames=g.frames if e.frames is None else e.frames,
            height=g.height if e.height is None else e.height,
            width=g.width if e.width is None else e.width,
            steps=g.steps if e.steps is None else e.steps,
            guidance_scale=g.guidance_scale,
            shift=g.shift,
            sampler=g.sampler,
            fps=g.fps,
            negative_prompt=g.negative_prompt,
        )

    def request(self) -> dict[str, Any]:
        """Keyword arguments of S2VPipeline.__call__ (without prompt, references, seed)."""
        values = asdict(self)
        values.pop("fps")
        return values


# ---- the model under evaluation -------------------------------------------------------------------


@dataclass
class ModelSource:
    ref: str  # as given on the command line
    checkpoint: Path  # local DiT checkpoint (file or folder)
    identity: str  # changes when the weights change
    registry_name: str | None = None
    registry_version: str | None = None
    model_folder: Path | None = None  # the version's MLflow Model (its own VAE / text encoder), if any
    lora: Path | None = None  # a LoRA adapter merged into `checkpoint` (a LoRA version or training export)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"ref": self.ref, "checkpoint": str(self.checkpoint), "identity": self.identity}
        if self.lora is not None:
            info["lora"] = str(self.lora)
        if self.registry_name:
            info["registry"] = {"name": self.registry_name, "version": self.registry_version}
        return info


def _path_identity(path: Path) -> str:
    """Hash of file names, sizes and modification times (cheap; catches replaced weights)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for item in files:
        stat = item.stat()
        digest.update(f"{item.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def resolve_model(ref: str, params: Params) -> ModelSource:
    """A local checkpoint for `ref`: a path, or a registry version (kaleido.serving.resolve_model: resolved,
    downloaded once into the shared cache, $KALEIDO_CACHE)."""
    if ref.startswith("models:/"):
        from kaleido.registry import parse_model_ref
        from kaleido.serving import ServingError
        from kaleido.serving import resolve_model as resolve_registered

        try:
            folder, label = resolve_registered(ref, params.platform.mlflow_tracking_uri)
            checkpoint, lora = model_weights(folder, params.platform.mlflow_tracking_uri or None)
        except ServingError as exc:
            raise EvalError(str(exc)) from None
        name, version = parse_model_ref(label)
        return ModelSource(ref, checkpoint, label, name, version, folder, lora)
    path = Path(ref).expanduser().resolve()
    if not path.exists():
        raise EvalError(f"--model {ref}: no such file or folder; pass a local checkpoint or models:/<name>@<alias>")
    from kaleido.serving import ServingError

    try:  # a LoRA training export evaluates as its base with the adapter merged
        checkpoint, lora = model_weights(path)
    except ServingError as exc:
        raise EvalError(f"--model {ref}: {exc}") from None
    identity = _path_identity(path) + (f"+{_path_identity(checkpoint)}" if lora is not None else "")
    return ModelSource(ref, checkpoint if lora is not None else path, f"path:{path}:{identity}", lora=lora)


# ---- metric backbones -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Paths:
    """The local paths and names of the configured backbones (eval.models, falling back to data.models)."""

    clip: Path | None
    clip_arch: str
    dino: Path | None
    aesthetic_clip: Path | None
    aesthetic_head: Path | None
    musiq: Path | None
    interpolator_path: Path | None
    viclip: Path | None
    grounding_dino: Path | None
    sam: Path | None
    sam_type: str

    @classmethod
    def from_params(cls, params: Params) -> _Paths:
        m, d = params.eval.models, params.data.models
        return cls(
            clip=params.resolve(m.clip if m.clip is not None else d.clip),
            clip_arch=m.clip_arch if m.clip is not None else d.clip_arch,
            dino=params.resolve(m.dino),
            aesthetic_clip=params.resolve(m.aesthetic_clip),
            aesthetic_head=params.resolve(m.aesthetic_head),
            musiq=params.resolve(m.musiq),
            interpolator_path=params.resolve(m.interpolator_path),
            viclip=params.resolve(m.viclip),
            grounding_dino=params.resolve(m.grounding_dino if m.grounding_dino is not None else d.grounding_dino),
            sam=params.resolve(m.sam if m.sam is not None else d.sam),
            sam_type=m.sam_type or d.sam_type,
        )


def _need(path: Path | None, key: str, metric: str) -> Path:
    if path is None:
        raise EvalError(f"metric {metric} needs {key} in params.yaml (a local path), or drop it from eval.metrics")
    return path


def backbone_plan(params: Params) -> dict[str, str]:
    """{metrics.json key: what computes it}, from the configuration alone (nothing loaded).

    Raises EvalError when a configured metric lacks its backbone path, before anything is generated.
    """
    from kaleido.eval.interpolation import FarnebackInterpolator

    e, m = params.eval, params.eval.models
    paths = _Paths.from_params(params)
    wanted = list(dict.fromkeys(e.metrics))
    plan: dict[str, str] = {}
    clip = ""
    if {"background_consistency", "text_alignment", "s2v_consistency", "s2v_decoupling"} & set(wanted):
        clip_path = _need(paths.clip, "eval.models.clip (or data.models.clip)", "background / text / S2V")
        clip = f"CLIP {paths.clip_arch if clip_path.is_file() else 'open_clip folder'} from {clip_path}"
    for name in wanted:
        if name == "subject_consistency":
            dino = _need(paths.dino, "eval.models.dino", name)
            plan[name] = f"DINO ViT (timm {m.dino_arch if dino.is_file() else 'folder'}) from {dino}"
        elif name == "background_consistency":
            plan[name] = clip
        elif name == "motion_smoothness":
            if m.interpolator == "farneback":
                plan[name] = FarnebackInterpolator().describe()
            else:
                path = _need(paths.interpolator_path, "eval.models.interpolator_path", name)
                plan[name] = f"TorchScript interpolation network from {path} (VBench: AMT-S)"
        elif name == "aesthetic_quality":
            model = _need(paths.aesthetic_clip, "eval.models.aesthetic_clip", name)
            head = _need(paths.aesthetic_head, "eval.models.aesthetic_head", name)
            arch = m.aesthetic_clip_arch if model.is_file() else "open_clip folder"
            plan[name] = f"LAION linear head {head} on CLIP {arch} from {model}"
        elif name == "imaging_quality":
            plan[name] = f"MUSIQ (pyiqa) {_need(paths.musiq, 'eval.models.musiq', name)}"
        elif name == "text_alignment":
            if paths.viclip is not None:
                plan["viclip_score"] = f"ViCLIP (TorchScript {paths.viclip})"
            else:
                plan["clip_text_score"] = f"CLIP image-text score ({clip}); ViCLIP weights not given"
        elif name in ("s2v_consistency", "s2v_decoupling"):
            s = e.s2v
            detector = _need(paths.grounding_dino, "eval.models.grounding_dino (or data.models.grounding_dino)", name)
            sam = _need(paths.sam, "eval.models.sam (or data.models.sam)", name)
            plan[name] = (
                f"Grounding DINO {detector} (box {s.box_threshold}, text {s.text_threshold}, "
                f"{s.detections_per_term} per term) + SAM {paths.sam_type} {sam} + {clip}; "
                f"frames scored: {s.max_frames or 'all'}"
            )
    return plan


@dataclass
class MetricSuite:
    """The loaded backbones and which metrics to compute; `score` does one video."""

    metrics: list[str]
    dino: Any = None
    clip: Any = None  # ClipFeatures for background consistency
    interpolator: Any = None
    aesthetic: Any = None
    musiq: Any = None
    text: Any = None  # TextVideoScorer
    s2v: Any = None  # S2VScorer
    descriptions: dict[str, str] = field(default_factory=dict)

    def backbones(self) -> dict[str, str]:
        """{metrics.json key: what computes it} for the metrics this suite scores."""
        keys = [self.text.metric if name == "text_alignment" else name for name in self.metrics]
        return {key: self.descriptions.get(key, "") for key in dict.fromkeys(keys)}

    @classmethod
    def from_params(cls, params: Params, device: str | None = None) -> MetricSuite:
        """Load the backbones the configured metrics need, from local paths."""
        from kaleido.eval import vbench
        from kaleido.eval.interpolation import load_interpolator
        from kaleido.vision.clip import ClipScorer

        e, m = params.eval, params.eval.models
        plan = backbone_plan(params)  # validates every path first
        paths = _Paths.from_params(params)
        device = device or m.device
        wanted = list(dict.fromkeys(e.metrics))
        suite = cls(metrics=wanted, descriptions=plan)
        clip_scorer = None
        if paths.clip is not None and {"background_consistency", "text_alignment", "s2v_consistency",
                                       "s2v_decoupling"} & set(wanted):
            clip_scorer = ClipScorer.from_pretrained(paths.clip, paths.clip_arch, device=device)
            suite.clip = vbench.ClipFeatures.from_scorer(clip_scorer, f"{paths.clip_arch} from {paths.clip}")
        if "subject_consistency" in wanted:
            suite.dino = vbench.DinoFeatures.from_pretrained(paths.dino, m.dino_arch, device=device)
        if "motion_smoothness" in wanted:
            suite.interpolator = load_interpolator(m.interpolator, paths.interpolator_path, device)
        if "aesthetic_quality" in wanted:
            scorer = ClipScorer.from_pretrained(paths.aesthetic_clip, m.aesthetic_clip_arch, device=device)
            features = vbench.ClipFeatures.from_scorer(scorer, f"{m.aesthetic_clip_arch} from {paths.aesthetic_clip}")
            suite.aesthetic = vbench.AestheticPredictor.from_files(features, paths.aesthetic_head)
        if "imaging_quality" in wanted:
            suite.musiq = vbench.MusiqScorer.from_checkpoint(paths.musiq, device=device)
        if "text_alignment" in wanted:
            if paths.viclip is not None:
                suite.text = vbench.ViClipScorer.from_file(paths.viclip, device=device)
            else:
                suite.text = vbench.ClipTextScorer(clip_scorer, suite.clip)
        if {"s2v_consistency", "s2v_decoupling"} & set(wanted):
            from kaleido.eval.s2v import S2VScorer
            from kaleido.vision.grounding import GroundingDino
            from kaleido.vision.segmentation import SamSegmenter

            s = e.s2v
            detector = GroundingDino.from_pretrained(paths.grounding_dino, s.box_threshold, s.text_threshold,
                                                     device=device)
            segmenter = SamSegmenter.from_checkpoint(paths.sam, paths.sam_type, device=device)
            suite.s2v = S2VScorer(detector, segmenter, clip_scorer, s.detections_per_term, s.max_frames)
        return suite

    def score(self, frames: np.ndarray, case: EvalCase, references: Sequence[Any]) -> tuple[dict[str, float],
                                                                                             dict[str, Any]]:
        """(metrics, details) of one generated video."""
        from kaleido.eval import vbench

        metrics: dict[str, float] = {}
        details: dict[str, Any] = {"seconds": {}}

        def timed(name: str, compute: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            value = compute()
            details["seconds"][name] = round(time.perf_counter() - start, 3)
            return value

        for name in self.metrics:
            if name == "subject_consistency":
                metrics[name] = timed(name, lambda: vbench.subject_consistency(frames, self.dino))
            elif name == "background_consistency":
                metrics[name] = timed(name, lambda: vbench.background_consistency(frames, self.clip))
            elif name == "motion_smoothness":
                metrics[name] = timed(name, lambda: vbench.motion_smoothness(frames, self.interpolator))
            elif name == "aesthetic_quality":
                metrics[name] = timed(name, lambda: vbench.aesthetic_quality(frames, self.aesthetic))
            elif name == "imaging_quality":
                metrics[name] = timed(name, lambda: vbench.imaging_quality(frames, self.musiq))
            elif name == "text_alignment":
                metrics[self.text.metric] = timed(self.text.metric, lambda: self.text.score(frames, case.prompt))
        if self.s2v is not None:
            result = timed("s2v", lambda: self.s2v.score(frames, references, case.subjects))
            if "s2v_consistency" in self.metrics:
                metrics["s2v_consistency"] = result.consistency
            if "s2v_decoupling" in self.metrics:
                metrics["s2v_decoupling"] = result.decoupling
            details["s2v"] = result.details()
        return {key: float(value) for key, value in metrics.items()}, details


# ---- running --------------------------------------------------------------------------------------


@dataclass
class EvalSummary:
    out_dir: Path
    metrics_path: Path
    report_path: Path
    document: dict[str, Any]
    generated: list[str]
    skipped: list[str]
    mlflow_run_id: str | None = None


def _write_json(path: Path, data: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a result behind (keys in their order)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _shrink(frames: np.ndarray, max_height: int) -> np.ndarray:
    """Frames scaled down (aspect kept) to at most `max_height` rows; small frames are left as they are."""
    from PIL import Image

    height, width = frames.shape[1:3]
    if height <= max_height:
        return frames
    size = (max(1, round(width * max_height / height)), max_height)
    return np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS)) for frame in frames])


def _previews(frames: np.ndarray, case_dir: Path) -> None:
    """strip.png: up to 8 evenly spaced frames, STRIP_HEIGHT high (embedded in the report); sheet.png:
    every frame at most SHEET_HEIGHT high (an 81-frame 480p sheet stays a few MB)."""
    from kaleido.model.media import contact_sheet

    picks = sorted({round(float(v)) for v in np.linspace(0, len(frames) - 1, min(STRIP_FRAMES, len(frames)))})
    # contact_sheet and write_video write whole or not at all (a temporary name, then a rename)
    contact_sheet(_shrink(frames[picks], STRIP_HEIGHT), case_dir / "strip.png", columns=len(picks))
    contact_sheet(_shrink(frames, SHEET_HEIGHT), case_dir / "sheet.png")


def run_key(case: EvalCase, model: ModelSource, settings: EvalSettings, backbones: dict[str, str]) -> str:
    blob = json.dumps([case.fingerprint(), model.identity, asdict(settings), backbones], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_validation(source: ModelSource, params: Params) -> dict[str, Any] | None:
    """The held-out validation losses of the model under evaluation, from its training's val_loss.json.

    A local training export (<stage>/export) reads <stage>/val_loss.json when <stage>/export.json names that export;
    a registry version reads the artifact of its training run (tag lineage.training_run_id). None when the model
    was not trained here with a validation split (the gate then cannot use val_loss for it).
    """
    from kaleido.train.validation import RECORD_NAME, validation_block

    record_path: Path | None = None
    checkpoint = Path(source.lora or source.checkpoint)  # a LoRA run's export is its adapter
    export_info = checkpoint.parent / "export.json"
    if export_info.is_file():
        try:
            named = (export_info.parent / json.loads(export_info.read_text()).get("path", "")).resolve()
        except (OSError, json.JSONDecodeError):
            named = None
        if named == checkpoint.resolve() and (checkpoint.parent / RECORD_NAME).is_file():
            record_path = checkpoint.parent / RECORD_NAME
    uri = params.platform.mlflow_tracking_uri
    if record_path is None and source.registry_name and uri:
        from kaleido.registry import ModelRegistry

        registry = ModelRegistry(uri, source.registry_name)
        tags = call_tracking(uri, "reading the version's tags",
                             lambda: registry.version_tags(str(source.registry_version)))
        run_id = tags.get("lineage.training_run_id")
        if run_id:
            # a private folder, not the shared model cache: two evaluations of one version may run at once
            with tempfile.TemporaryDirectory(prefix="kaleido-val-") as tmp:
                try:
                    downloaded = Path(call_tracking(uri, "downloading the validation record",
                                                    lambda: registry.client.download_artifacts(run_id, RECORD_NAME,
                                                                                               tmp)))
                except TrackingUnavailable:
                    raise
                except Exception:  # the run has no such artifact (trained without a validation split)
                    return None
                return validation_block(json.loads(downloaded.read_text()))
    if record_path is None or not record_path.is_file():
        return None
    return validation_block(json.loads(record_path.read_text()))


def _prompt_truncations(params: Params, evalset: EvalSet, echo: Callable[[str], None]) -> dict[str, dict]:
    """Case id -> what truncation drops from its prompt (model.text_len tokens), warned now, before any model."""
    from kaleido.model.text_encoder import load_tokenizer, prompt_truncation

    folder = params.resolve(params.model.tokenizer or params.model.text_encoder)
    if folder is None or not folder.is_dir():
        return {}  # the model load that follows names the missing folder
    tokenizer = load_tokenizer(folder)
    found = {}
    for case in evalset.cases:
        truncation = prompt_truncation(tokenizer, case.prompt, params.model.text_len)
        if truncation is not None:
            echo(f"warning: case {case.id}: " + truncation.message())
            found[case.id] = truncation.to_json()
    return found


def evaluate(
    params: Params,
    model: str,
    eval_set: Path | str | None = None,
    out_dir: Path | str = "runs/eval",
    *,
    device: str | None = None,
    fresh: bool = False,
    log_mlflow: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    suite: MetricSuite | None = None,
    pipeline: Any = None,
) -> EvalSummary:
    """Evaluate `model` (a local checkpoint or models:/name@alias) on an eval set; see the module docstring.

    `suite` / `pipeline` replace the loaded backbones / S2V pipeline (tests, notebooks). The output folder is locked
    for the whole run: a second evaluation into it is refused at once (OutputBusy names the holder). EvalNotLogged
    when the MLflow server stopped answering: every local output is complete, only the logging is missing.
    """
    out_dir = Path(out_dir).resolve()
    with exclusive_output(out_dir, "kaleido evaluate"):
        return _evaluate(params, model, eval_set, out_dir, device=device, fresh=fresh, log_mlflow=log_mlflow,
                         progress=progress, echo=echo, suite=suite, pipeline=pipeline)


def _evaluate(
    params: Params,
    model: str,
    eval_set: Path | str | None,
    out_dir: Path,
    *,
    device: str | None,
    fresh: bool,
    log_mlflow: bool,
    progress: bool,
    echo: Callable[[str], None],
    suite: MetricSuite | None,
    pipeline: Any,
) -> EvalSummary:
    from kaleido.model.media import load_reference_image, write_video
    from kaleido.model.vae import validate_video_size

    # a folder given here is relative to the working directory; the params.yaml default to its folder
    folder = Path(eval_set).expanduser() if eval_set is not None else params.resolve(params.eval.eval_set)
    evalset: EvalSet = load_eval_set(
        folder, params.model.max_references, params.eval.seed, params.media.max_image_pixels
    )
    settings = EvalSettings.from_params(params)
    try:
        validate_video_size(settings.frames, settings.height, settings.width)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    wanted = suite.metrics if suite is not None else params.eval.metrics
    if "motion_smoothness" in wanted and settings.frames < 3:
        raise EvalError(f"frames={settings.frames}: motion smoothness needs at least 3 frames (eval.frames)")
    if log_mlflow and params.platform.mlflow_tracking_uri:
        _check_tracking(params.platform.mlflow_tracking_uri)  # fail now, not after generating every case
    truncations = _prompt_truncations(params, evalset, echo)
    with mlflow_request_limits(params.platform):
        source = resolve_model(model, params)
    # The plan names every backbone without loading one: a fully resumed run loads no model at all.
    backbones = suite.backbones() if suite is not None else backbone_plan(params)
    echo(f"evaluating {source.ref} on {evalset.name} ({len(evalset.cases)} cases) -> {out_dir}")

    generated, skipped, results = [], [], []
    from kaleido.platform.progress import Progress

    with Progress("evaluate", len(evalset.cases), "case", enabled=progress) as bar:
        for case in evalset.cases:
            bar.set(case=case.id)
            case_dir = out_dir / "cases" / case.id
            result_path = case_dir / "result.json"
            key = run_key(case, source, settings, backbones)
            if not fresh and result_path.is_file():
                previous = json.loads(result_path.read_text())
                if previous.get("key") == key:
                    skipped.append(case.id)
                    results.append(previous)
                    bar.update(1, skipped=True)
                    continue
            if pipeline is None:
                pipeline = _load_pipeline(params, source, device)
            references = [load_reference_image(path, params.media.max_image_pixels) for path in case.references]
            start = time.perf_counter()
            frames = pipeline(case.prompt, references, seed=case.seed, progress=False, warn_truncation=False,
                              **settings.request())
            seconds = time.perf_counter() - start
            write_video(frames, case_dir / "video.mp4", fps=settings.fps)
            _previews(frames, case_dir)
            if suite is None:
                suite = MetricSuite.from_params(params, device)
            metrics, details = suite.score(frames, case, references)
            details["seconds"]["generate"] = round(seconds, 3)
            result = {
                "id": case.id,
                "category": case.category,
                "prompt": case.prompt,
                "references": list(case.reference_names),
                "subjects": list(case.subjects),
                "seed": case.seed,
                "fingerprint": case.fingerprint(),
                "key": key,
                "metrics": metrics,
                "details": details,
            }
            if case.id in truncations:
                result["prompt_truncation"] = truncations[case.id]
            _write_json(result_path, result)  # last: its presence marks the case done
            generated.append(case.id)
            results.append(result)
            echo(f"  {case.id}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            bar.update(1)

    uri = params.platform.mlflow_tracking_uri if log_mlflow else ""
    lost: TrackingUnavailable | None = None
    try:
        with mlflow_request_limits(params.platform):
            validation = find_validation(source, params)
    except TrackingUnavailable as exc:  # the record lives in the registry: noted, the rest is written
        validation, lost = None, exc
        echo(f"warning: MLflow at {exc.uri}: {exc.what} failed ({exc.why}); metrics.json is written without the "
             "training's validation loss")
    document: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": source.describe(),
        "eval_set": {"path": str(evalset.root), "name": evalset.name, "fingerprint": evalset.fingerprint(),
                     "cases": len(evalset.cases), "categories": evalset.categories()},
        "settings": asdict(settings),
        "backbones": backbones,
        "text_metric": _text_metric(backbones),
        "metric_titles": {key: METRICS[key].title for key in backbones},
        **aggregate(results),
        "cases": results,
    }
    if validation is not None:  # the held-out loss of training: the gate's val_loss (lower is better)
        document["validation"] = validation
        document["overall"]["val_loss"] = validation["loss"]
        echo(f"validation loss: {validation['base_loss']:.4f} (base model) -> {validation['loss']:.4f} over "
             f"{len(validation['cases'])} held-out samples")
        if validation.get("reference_reliance") is not None:  # the gate's reference_reliance (higher is better)
            document["overall"]["reference_reliance"] = validation["reference_reliance"]
            base = validation.get("base_reference_reliance")
            echo(f"reference reliance (val loss with shuffled references - with own): "
                 f"{'n/a' if base is None else f'{base:.4f}'} (base model) -> {validation['reference_reliance']:.4f}")
    metrics_path = out_dir / "metrics.json"
    report_path = out_dir / "report.html"
    # Everything local first: an MLflow outage (or a crash while logging) never costs the results.
    _write_outputs(params, document, metrics_path, report_path)
    summary = EvalSummary(out_dir, metrics_path, report_path, document, generated, skipped, None)
    if uri and lost is None:
        try:
            with mlflow_request_limits(params.platform):
                summary.mlflow_run_id = _log_mlflow(params, document, source, out_dir, metrics_path, report_path)
        except TrackingUnavailable as exc:
            lost = exc
            retries = params.platform.mlflow_request_retries
            echo(f"warning: MLflow at {exc.uri}: {exc.what} failed after {retries} retries ({exc.why}); the results "
                 "are on disk, not logged")
    if lost is not None:
        raise EvalNotLogged(
            f"{lost}. The evaluation itself is complete: {metrics_path} and {report_path} are written, "
            + ("but it is not logged, and the registry version has no eval.run_id for the gate yet. " if
               source.registry_name else "but it is not logged. ")
            + "Once the server answers, run the same `kaleido evaluate` again: every case is reused and only the "
            "logging runs",
            summary,
        )
    echo(f"metrics: {metrics_path}\nreport: {report_path}"
         + (f"\nmlflow run: {summary.mlflow_run_id}" if summary.mlflow_run_id else ""))
    return summary


def _check_tracking(uri: str) -> None:
    """A tracking server that does not answer its health check is an error before any work starts."""
    from kaleido.platform.services import tracking_problem

    problem = tracking_problem(uri, timeout=10)
    if problem is not None:
        raise EvalError(
            f"the MLflow server at {uri} (platform.mlflow_tracking_uri) does not answer ({problem}); start it "
            "(`kaleido platform up`), or pass --no-mlflow (or set platform.mlflow_tracking_uri to \"\") to evaluate "
            "without logging"
        )


def _text_metric(backbones: dict[str, str]) -> dict[str, str] | None:
    """Which text-alignment metric was used, and its label (a CLIP stand-in is never silent)."""
    for key in ("viclip_score", "clip_text_score"):
        if key in backbones:
            return {"key": key, "label": backbones[key]}
    return None


def _load_pipeline(params: Params, source: ModelSource, device: str | None) -> Any:
    from kaleido.model.checkpoint import check_weight_files
    from kaleido.model.generate import S2VPipeline
    from kaleido.serving import params_for_model

    try:
        if source.model_folder is not None:  # a registered version brings its own assets, adapter, R-RoPE settings
            local = params_for_model(params, source.model_folder)
        else:
            local = params.model_copy(deep=True)
            local.model.checkpoint, local.model.lora = source.checkpoint, source.lora
        # every weight file whole before the first model loads (a truncated VAE would fail after the DiT loaded)
        for part in (local.model.checkpoint, local.model.lora, local.model.vae, local.model.text_encoder):
            resolved = local.resolve(part) if part is not None else None
            if resolved is not None and resolved.exists():
                check_weight_files(resolved)
        return S2VPipeline.from_params(local, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(f"cannot load the model {source.ref}: {exc}") from None


def _write_outputs(params: Params, document: dict[str, Any], metrics_path: Path, report_path: Path) -> None:
    """metrics.json, summary.json, cases.csv and report.html, each whole or absent."""
    from kaleido.eval.report import write_report

    _write_json(metrics_path, document)
    _write_json(metrics_path.with_name("summary.json"),
                {"overall": document["overall"], "per_category": document["per_category"]})  # fmt: skip
    write_cases_csv(document, metrics_path.with_name("cases.csv"))
    write_report(document, report_path, params.gate)


def write_cases_csv(document: dict[str, Any], path: Path) -> None:
    """One row per case, the metrics in METRICS order (columns the run did not compute are left out)."""
    import csv

    columns = [key for key in METRICS if any(key in case["metrics"] for case in document["cases"])]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "category", *columns])
        for case in document["cases"]:
            writer.writerow([case["id"], case["category"], *(case["metrics"].get(key, "") for key in columns)])


def _log_mlflow(params: Params, document: dict[str, Any], source: ModelSource, out_dir: Path,
                metrics_path: Path, report_path: Path) -> str:
    """One MLflow run: params, overall + per-category metrics, metrics.json, report, strips and sheets.

    The local outputs are written before (they do not wait for the server). TrackingUnavailable when the server
    stops answering: the run created here stays RUNNING on the server and the next evaluation into this folder marks
    it FAILED (RUN_RECORD); metrics.json is rewritten without the unfinished run's id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = params.platform.mlflow_tracking_uri
    record = out_dir / RUN_RECORD
    if record.is_file():  # an earlier evaluation into this folder that stopped while logging
        mark_left_behind(uri, record, "evaluation")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def create() -> str:
        experiment = client.get_experiment_by_name(params.eval.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(params.eval.experiment)
        tags = {"kaleido.kind": "evaluation", "eval.model": source.ref, "eval.set": document["eval_set"]["name"]}
        if source.registry_name:
            tags.update({"eval.registered_model": source.registry_name,
                         "eval.model_version": str(source.registry_version)})
        return client.create_run(experiment_id, run_name=f"eval {source.ref}", tags=tags).info.run_id

    run_id = call_tracking(uri, "creating the evaluation run", create)
    write_json_atomic(record, {"run_id": run_id, "tracking_uri": uri, "experiment": params.eval.experiment})
    document["mlflow"] = {"tracking_uri": uri, "run_id": run_id, "experiment": params.eval.experiment}
    _write_outputs(params, document, metrics_path, report_path)

    def upload() -> None:
        stamp = int(time.time() * 1000)
        values = [Metric(key, value, stamp, 0) for key, value in document["overall"].items() if value is not None]
        for category, scores in document["per_category"].items():
            values += [Metric(f"{category}/{key}", value, stamp, 0) for key, value in scores.items()
                       if value is not None]
        logged = {"model": source.ref, "eval_set": document["eval_set"]["name"],
                  "eval_set_fingerprint": document["eval_set"]["fingerprint"], "cases": document["eval_set"]["cases"],
                  **{f"generate.{k}": v for k, v in document["settings"].items()},
                  **{f"backbone.{k}": v[:500] for k, v in document["backbones"].items()}}
        client.log_batch(run_id, metrics=values, params=[Param(k, str(v)) for k, v in logged.items()])
        client.log_artifact(run_id, str(metrics_path))
        client.log_artifact(run_id, str(report_path))
        client.log_artifact(run_id, str(metrics_path.with_name("cases.csv")))
        with tempfile.TemporaryDirectory(prefix="kaleido-eval-") as staging:
            # one upload for every case's results and previews (the videos stay on disk)
            for result in document["cases"]:
                case_dir = out_dir / "cases" / result["id"]
                (Path(staging) / result["id"]).mkdir()
                for name in ("result.json", "strip.png", "sheet.png"):
                    if (case_dir / name).is_file():
                        shutil.copy2(case_dir / name, Path(staging) / result["id"] / name)
            client.log_artifacts(run_id, staging, artifact_path="cases")
        client.set_terminated(run_id, "FINISHED")
        if source.registry_name:
            # the gate finds a version's scores through this tag
            version = str(source.registry_version)
            client.set_model_version_tag(source.registry_name, version, "eval.run_id", run_id)
            client.set_model_version_tag(source.registry_name, version, "eval.set",
                                         f"{document['eval_set']['name']}:{document['eval_set']['fingerprint']}")

    try:
        call_tracking(uri, "logging the evaluation", upload)
    except TrackingUnavailable:
        document.pop("mlflow")  # metrics.json must not name a run that holds no results
        _write_outputs(params, document, metrics_path, report_path)
        raise
    except Exception:
        client.set_terminated(run_id, "FAILED")  # the server answers: the request's own error, recorded as such
        raise
    return run_id
