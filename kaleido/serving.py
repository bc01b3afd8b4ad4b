"""Every registered version is an MLflow Model: `mlflow.pyfunc.load_model("models:/kaleido-s2v@champion")`,
`kaleido serve` (MLflow's scoring app, bounded: kaleido/serve_app.py), `mlflow models serve` and `kaleido generate
--model models:/...` all load the same folder.

Layout of a version's MLflow Model (the `model/` artifact of its training run):
  MLmodel                   python_function flavor (kaleido/pyfunc_model.py as code), signature, model_config
  input_example.json        one request
  artifacts/transformer/    the DiT weights (Wan2.1 layout): the version itself, always copied
  artifacts/lora/           a LoRA version only: the adapter (peft, diffusers and Wan/ComfyUI layouts); its frozen
                            base is then `transformer`, copied or (model_assets: reference) referenced like the
                            assets below, so a LoRA version costs megabytes, not the base's gigabytes
  artifacts/{vae,text_encoder,tokenizer}/   only with platform.model_assets: copy
With `reference` (the default) the VAE, text encoder and tokenizer are uploaded ONCE per content hash to a run of
the `kaleido-assets` experiment and the model names them (`model_config.assets`: runs:/<id>/<name> URIs); loading
downloads them into a local cache (~/.cache/kaleido/assets/<sha256>). Cost of `copy`: every version repeats them
(umt5-xxl is ~11 GB in bf16, the Wan VAE ~0.5 GB, next to 2.8 GB / 28 GB of 1.3B / 14B DiT weights); the cost of
`reference`: the asset run must stay (deleting it breaks every version that names it).

A version takes rows (`prompt`, `references` as base64 images) and params (SETTINGS), and answers one video per row:
`video` (mp4 bytes; base64 in a served JSON response), `frames`, `fps`, `width`, `height`, `seed` (the one used).
The requests themselves (references, settings, limits, cancellation) are kaleido/serve_requests.py. Every file of a
version is checked against the manifest in its MLmodel (`model_config.files`: size and sha256) before it is loaded
(`verify_model_folder`), naming the file that is missing or differs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaleido.platform.files import folder_sha256
from kaleido.platform.integrity import IntegrityError, cache_root
from kaleido.request_limits import Limits

if TYPE_CHECKING:
    from kaleido.config import Params

# MLflow's download progress bars would fill logs and command output (one per downloaded folder)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow nags about type hints on PythonModel.predict either way; this model's signature is explicit
warnings.filterwarnings("ignore", message=r"(?s)(.*type hints?\b.*predict|.*predict.*type hints?\b)",
                        category=UserWarning)

ASSET_PARTS = ("vae", "text_encoder", "tokenizer")
ASSETS_EXPERIMENT = "kaleido-assets"
SETTINGS = ("seed", "steps", "frames", "height", "width", "guidance_scale", "shift", "sampler", "negative_prompt")
# the MLflow signature's type of each setting (a request's params are checked against these before MLflow sees them)
SETTING_KINDS = {"seed": "long", "steps": "long", "frames": "long", "height": "long", "width": "long",
                 "guidance_scale": "double", "shift": "double", "sampler": "string", "negative_prompt": "string"}
INPUTS = ("prompt", "references")  # the signature's input columns: one row per video
MANIFEST_KEY = "files"  # model_config.files: {path inside the MLflow Model: {"size", "sha256"}}
# a small PNG (8x8 white) so the input example stays a few hundred bytes
_EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAEklEQVR4nGP8//8/A27AhEduBEsAHgMECz8qDzUAAAAASUVORK5CYII="
)


class ServingError(ValueError):
    """A request or a model folder that cannot be served; the message names the field and the fix."""


def encode_image(path: str | Path) -> str:
    """A file as the base64 string the model takes (for callers that hold files)."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ---- assets -----------------------------------------------------------------------------------------------




def upload_assets(client: Any, paths: dict[str, Path]) -> dict[str, str]:
    """{part: runs:/<id>/<part>}: each asset folder uploaded once per content hash (reused when already there)."""
    experiment = client.get_experiment_by_name(ASSETS_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(ASSETS_EXPERIMENT)
    uris = {}
    for part, path in paths.items():
        sha = folder_sha256(path)
        found = client.search_runs([experiment_id], f"tags.`asset.sha256` = '{sha}' and tags.`asset.part` = '{part}'",
                                   max_results=1)
        found = [run for run in found if run.info.status == "FINISHED"]
        if found:
            run_id = found[0].info.run_id
        else:
            run = client.create_run(experiment_id, run_name=f"{part}-{sha[:12]}",
                                    tags={"asset.sha256": sha, "asset.part": part, "asset.source": str(path)})
            run_id = run.info.run_id
            client.log_artifacts(run_id, str(path), artifact_path=part)
            client.set_terminated(run_id, "FINISHED")
        uris[part] = f"runs:/{run_id}/{part}#{sha}"
    return uris


def resolve_asset(uri: str, tracking_uri: str | None = None) -> Path:
    """A local folder for an asset URI (`runs:/<id>/<part>#<sha256>`), downloaded once into the cache from the
    tracking server `tracking_uri` (default: MLflow's current one, e.g. $MLFLOW_TRACKING_URI)."""
    import mlflow
    import mlflow.artifacts
    from filelock import FileLock

    location, _, sha = uri.partition("#")
    target = cache_root() / "assets" / (sha or hashlib.sha256(location.encode()).hexdigest())
    done = target / ".complete"
    if done.is_file():
        return Path(done.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # one download per cache, however many processes ask at once
        if done.is_file():
            return Path(done.read_text())
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(partial),
                                                         tracking_uri=tracking_uri or mlflow.get_tracking_uri()))
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
        final = target / local.relative_to(partial)
        done.write_text(str(final))
        return final


# ---- the pyfunc model ---------------------------------------------------------------------------------------


def load_pipeline(transformer: Path | None, config: dict[str, Any], artifacts: dict[str, str] | None = None,
                  device: str | None = None) -> tuple[Any, dict[str, Any]]:
    """S2VPipeline from a model folder's DiT weights (None: the referenced `transformer` asset of a LoRA version),
    its LoRA adapter if any (artifact `lora`, merged at load) and its config (copied or referenced assets)."""
    import torch

    from kaleido.model.checkpoint import load_dit
    from kaleido.model.dit import DiTConfig
    from kaleido.model.generate import DTYPES, S2VPipeline, default_device, vae_dtype
    from kaleido.model.text_encoder import TextEncoder
    from kaleido.model.vae import WanVAE

    artifacts = artifacts or {}
    root = _model_root(artifacts)
    if root is not None:
        verify_model_folder(root, "MLflow Model")
    paths = {}
    for part in ASSET_PARTS:
        if part in artifacts:
            paths[part] = Path(artifacts[part])
        elif part in config.get("assets", {}):
            paths[part] = resolve_asset(config["assets"][part])
        else:
            raise ServingError(f"the model names no {part} (model_config.assets); re-register it")
    if transformer is None:
        if "transformer" not in config.get("assets", {}):
            raise ServingError("the model has neither a transformer artifact nor a referenced one; re-register it")
        transformer = resolve_asset(config["assets"]["transformer"])
    lora = config.get("lora") or {}
    target = torch.device(device) if device else default_device()
    dtype = DTYPES[config.get("dtype") or ("bfloat16" if target.type == "cuda" else "float32")]
    dit = load_dit(transformer, config=DiTConfig(**{**config["dit"], "patch_size": tuple(config["dit"]["patch_size"])}),
                   rope_variant=config["rope_variant"], rope_offset=int(config["rope_offset"]), dtype=dtype,
                   device=target, lora=artifacts.get("lora") if lora else None, lora_scale=float(lora.get("scale", 1)))
    vae = WanVAE.from_pretrained(paths["vae"], device=target, dtype=vae_dtype(config.get("vae_dtype"), target))
    text = TextEncoder.from_pretrained(paths["text_encoder"], paths["tokenizer"], device=target, dtype=dtype)
    pipe = S2VPipeline(dit, vae, text, text_len=int(config["text_len"]), max_references=int(config["max_references"]),
                       device=target, dtype=dtype)
    return pipe, config


def _model_root(artifacts: dict[str, str]) -> Path | None:
    """The MLflow Model folder that holds these pyfunc artifacts (MLflow keeps them under <model>/artifacts/)."""
    for value in artifacts.values():
        for parent in Path(value).parents[:3]:
            if (parent / "MLmodel").is_file():
                return parent
    return None


def signature(params: Params) -> Any:
    """Inputs (prompt, references), params with their params.yaml defaults, outputs."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    g = params.generate
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec(Array("string"), "references", required=False)]),
        outputs=Schema([ColSpec("binary", "video"), ColSpec("long", "frames"), ColSpec("long", "fps"),
                        ColSpec("long", "width"), ColSpec("long", "height"), ColSpec("long", "seed")]),
        params=ParamSchema([ParamSpec(key, SETTING_KINDS[key], getattr(g, key)) for key in SETTINGS]),
    )


def model_config(params: Params, dit_config: Any, settings: Any = None) -> dict[str, Any]:
    """A version's model_config: its DiT config, the settings it was trained with (kaleido.model.settings; None:
    params.yaml's), dtypes, limits and generation defaults."""
    from kaleido.model.settings import ModelSettings

    g = params.generate
    settings = settings or ModelSettings.from_params(params)
    return {
        "dit": dit_config.to_dict(), "rope_variant": settings.rope_variant, "rope_offset": settings.rope_offset,
        "dtype": None if params.model.dtype == "float32" else params.model.dtype,  # None: bf16 on GPU, fp32 on CPU
        "vae_dtype": params.model.vae_dtype, "text_len": settings.text_len,
        "max_references": settings.max_references, "max_image_pixels": params.media.max_image_pixels,
        "allow_remote_references": params.serve.allow_remote_references,
        "limits": Limits.from_params(params).to_config(),
        "defaults": {**{key: getattr(g, key) for key in SETTINGS}, "fps": g.fps},
    }


def build_model(checkpoint: Path, params: Params, dst: Path, client: Any | None = None) -> Path:
    """Write a version's MLflow Model folder at `dst` from DiT weights `checkpoint` and the params' model assets.

    A LoRA training export as `checkpoint` packages the adapter plus its frozen base (the adapter names it);
    model_config.lora records rank, alpha, targets and the base. platform.model_assets decides whether the VAE /
    text encoder / tokenizer (and a LoRA version's base) are copied or referenced (uploaded once per content hash
    through `client`, the registry's MlflowClient).
    """
    import mlflow.pyfunc

    from kaleido.model.checkpoint import CheckpointError, inspect_checkpoint, read_settings, read_shapes
    from kaleido.model.lora import LoraError, check_fits
    from kaleido.model.settings import ModelSettings, resolve_settings
    from kaleido.train.plan import verify_export

    base, lora = model_weights(checkpoint)
    try:
        verify_export(checkpoint)  # a training export is registered as training sealed it
        info = inspect_checkpoint(base)
        adapter = None
        if lora is not None:
            adapter, _ = _adapter(lora)
            check_fits(adapter, read_shapes(base), f"its base {base}")
        # the version records what its weights were trained with, whatever the registering params.yaml says
        settings = resolve_settings(read_settings(base, adapter), ModelSettings.from_params(params), str(checkpoint))
    except (CheckpointError, LoraError, IntegrityError, ValueError) as exc:
        raise ServingError(f"cannot package {checkpoint}: {exc}") from None
    assets = {}
    for part in ASSET_PARTS:
        value = getattr(params.model, part) or (params.model.text_encoder if part == "tokenizer" else None)
        path = params.resolve(value)
        if path is None or not path.exists():
            raise ServingError(f"model.{part}: {path} does not exist; a registered version needs it to generate")
        assets[part] = path
    config = model_config(params, info.config, settings)
    artifacts = {"transformer": str(base)}
    staging = None
    if adapter is not None and lora is not None:
        config["lora"] = {"rank": adapter.rank, "alpha": adapter.alpha, "targets": adapter.targets, "scale": 1.0,
                          "base": str(base), "base_model": adapter.meta.get("base_model", "")}
        # MLflow names an artifact folder after its source's basename: stage the adapter as `lora`, in each layout
        from kaleido.model.lora import save_adapter_layouts

        staging = Path(tempfile.mkdtemp(prefix="kaleido-lora-"))
        save_adapter_layouts(adapter, staging / "lora")
        artifacts["lora"] = str(staging / "lora")
        if params.platform.model_assets == "reference":
            del artifacts["transformer"]  # the frozen base is shared by every adapter trained on it
            assets["transformer"] = base
    if params.platform.model_assets == "copy":
        artifacts |= {part: str(path) for part, path in assets.items()}
        # MLflow stores each under artifacts/<basename>: two different sources with one name would merge
        by_name: dict[str, set[str]] = {}
        for source in artifacts.values():
            by_name.setdefault(Path(source).name, set()).add(str(Path(source).resolve()))
        clashes = {name: sorted(paths) for name, paths in by_name.items() if len(paths) > 1}
        if clashes:
            raise ServingError(f"platform.model_assets: copy: {clashes} share a folder name and would overwrite each "
                               "other inside the MLflow Model; rename one of them or use model_assets: reference")
    else:
        if client is None:
            raise ServingError("platform.model_assets: reference needs the registry's MLflow client")
        config["assets"] = upload_assets(client, assets)
    if dst.exists():
        shutil.rmtree(dst)
    example = {"prompt": params.platform.sample_prompt, "references": [_EXAMPLE_PNG]}
    try:
        mlflow.pyfunc.save_model(
            str(dst), python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts=artifacts,
            signature=signature(params), input_example=_dataframe(example), model_config=config,
            pip_requirements=["kaleido-platform"],  # the platform's own environment (requirements.lock) serves it
        )
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    seal_model_folder(dst)
    return dst


def seal_model_folder(folder: Path) -> None:
    """Record every file of an MLflow Model folder (size, sha256; MLmodel itself aside) in its MLmodel as
    model_config.files: promotion, serving and loading check a version's files against it."""
    from mlflow.models import Model

    from kaleido.platform.integrity import folder_manifest

    path = Path(folder) / "MLmodel"
    model = Model.load(str(path))
    flavor = model.flavors["python_function"]
    flavor.setdefault("config", {})[MANIFEST_KEY] = folder_manifest(folder, exclude=("MLmodel",))
    model.save(str(path))


def model_manifest(folder: Path) -> dict[str, Any] | None:
    """model_config.files of an MLflow Model folder; None for one sealed before manifests existed."""
    return read_model_config(folder).get(MANIFEST_KEY)


def verify_model_folder(folder: Path, label: str = "") -> None:
    """Check a version's files against its MLmodel's manifest (size and sha256; a verdict is cached per file, so
    this costs one hash per file). IntegrityError naming the file when one is missing or differs. A folder without
    a manifest (sealed before manifests existed) must at least hold every artifact its MLmodel names."""
    from kaleido.platform.integrity import verify_manifest

    folder = Path(folder)
    if not (folder / "MLmodel").is_file():
        return  # a plain checkpoint or adapter: checked by its own loader
    what = f"{label} file" if label else "model file"
    fix = ("the version's copy is damaged: delete it from the cache ($KALEIDO_CACHE/models) to download it again, "
           "or re-register the version if the registry's copy is damaged")
    manifest = model_manifest(folder)
    if manifest is None:
        missing = [str(path) for path in model_artifacts(folder).values() if not path.exists()]
        if missing:
            raise IntegrityError(f"{what} {missing[0]} is missing; {fix}")
        return
    verify_manifest(folder, manifest, what=what, fix=fix)


def _dataframe(example: dict[str, Any]) -> Any:
    import pandas as pd

    return pd.DataFrame([example])


def model_artifacts(folder: Path) -> dict[str, Path]:
    """{name: local path} of an MLflow Model folder's pyfunc artifacts, as its MLmodel maps them (MLflow stores
    each under artifacts/<basename of its source>, not under its name); {} for a plain checkpoint folder."""
    import yaml

    path = Path(folder) / "MLmodel"
    if not path.is_file():
        return {}
    flavor = (yaml.safe_load(path.read_text()) or {}).get("flavors", {}).get("python_function", {})
    return {name: Path(folder) / entry["path"] for name, entry in (flavor.get("artifacts") or {}).items()}


def _adapter(path: Path) -> tuple[Any, str]:
    from kaleido.model.lora import LoraError, load_adapter

    try:
        return load_adapter(path)
    except LoraError as exc:
        raise ServingError(str(exc)) from None


def model_weights(folder: Path, tracking_uri: str | None = None) -> tuple[Path, Path | None]:
    """(DiT weights, LoRA adapter or None) of a version's MLflow Model folder, a local checkpoint, or a local LoRA
    adapter (a training export; its base is the path the adapter file names).

    A LoRA version's base is its `transformer` artifact, or the referenced asset (downloaded once into the cache
    from `tracking_uri`). ServingError when an MLflow Model has no DiT weights (not a Kaleido version) or a local
    adapter's base is not on this machine."""
    from kaleido.model.lora import adapter_meta, is_adapter

    folder = Path(folder)
    if (folder / "MLmodel").is_file():
        artifacts = model_artifacts(folder)
        config = read_model_config(folder)
        lora = artifacts.get("lora") if config.get("lora") else None
        if "transformer" in artifacts:
            return artifacts["transformer"], lora
        if lora is not None and "transformer" in config.get("assets", {}):
            return resolve_asset(config["assets"]["transformer"], tracking_uri), lora
        raise ServingError(f"{folder}: an MLflow Model without a `transformer` artifact is not a Kaleido version")
    if folder.exists() and is_adapter(folder):
        base = adapter_meta(folder).get("base")  # the header names the base: no tensor is read here
        if not base or not Path(base).exists():
            raise ServingError(f"{folder} is a LoRA adapter whose base ({base or 'not named in the file'}) is not on "
                               "this machine; pass the base as model.checkpoint and the adapter as model.lora (--lora)")
        return Path(base), folder
    return folder, None


def model_checkpoint(folder: Path, tracking_uri: str | None = None) -> Path:
    """The DiT weights of a version's folder or a local model (model_weights without the adapter)."""
    return model_weights(folder, tracking_uri)[0]


def read_model_config(folder: Path) -> dict[str, Any]:
    """model_config of an MLflow Model folder ({} for a plain checkpoint)."""
    import yaml

    path = Path(folder) / "MLmodel"
    if not path.is_file():
        return {}
    meta = yaml.safe_load(path.read_text())
    return meta.get("flavors", {}).get("python_function", {}).get("config") or {}


def local_assets(folder: Path, tracking_uri: str | None = None) -> dict[str, Path]:
    """{part: local path} of a version's VAE / text encoder / tokenizer (copied artifacts or the asset cache)."""
    folder = Path(folder)
    config = read_model_config(folder)
    found = {}
    copied = model_artifacts(folder)
    for part in ASSET_PARTS:
        if part in copied:
            found[part] = copied[part]
        elif part in config.get("assets", {}):
            found[part] = resolve_asset(config["assets"][part], tracking_uri)
    return found


def resolve_model(ref: str, tracking_uri: str, echo: Any = None) -> tuple[Path, str]:
    """A local folder for `ref` and the name to report: a models:/ URI (alias or version) is resolved in the
    registry and downloaded once into the cache ($KALEIDO_CACHE or ~/.cache/kaleido, models/<name>/v<N>-<identity>:
    the server, the version's source and creation time); a path is used as is.

    ServingError (naming the URI and the fix) when the registry has no such version or alias.
    """
    if not ref.startswith("models:/"):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ServingError(f"--model {ref}: no such file or folder; pass a local model or models:/<name>@<alias>")
        _verified(path.resolve(), str(path))
        return path.resolve(), str(path)
    from kaleido.registry import RegistryError, find_version

    if not tracking_uri:
        raise ServingError(f"--model {ref}: a registry reference needs platform.mlflow_tracking_uri in params.yaml")
    try:
        registry, version, record = find_version(ref, tracking_uri)
        name = registry.name
    except RegistryError as exc:
        raise ServingError(f"--model {ref}: {exc}") from None
    except Exception as exc:  # MLflow's own errors: unknown model, unreachable server
        raise ServingError(f"--model {ref}: cannot read the registry at {tracking_uri}: {str(exc)[:300]}") from None
    # "kaleido-s2v/1" of another server (or of this one after the model was deleted and registered again) is
    # another model: the cache key carries the server, the version's source and its creation time
    identity = hashlib.sha256(f"{tracking_uri}|{record.source}|{record.creation_timestamp}".encode()).hexdigest()
    target = cache_root() / "models" / name / f"v{version}-{identity[:12]}"
    done = target / ".complete"
    if not done.is_file():
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        # one download per cache: the ranks of a node (or two commands) wait for the first, then reuse it
        with FileLock(str(target) + ".lock"):
            if not done.is_file():
                if echo is not None:
                    echo(f"downloading models:/{name}/{version} into {target}")
                partial = target.with_name(target.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                folder = registry.download(version, partial)
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)
                done.write_text(str(target / folder.relative_to(partial)))
    label = f"models:/{name}/{version}"
    return _verified(Path(done.read_text()), label), label


def _verified(folder: Path, label: str) -> Path:
    """`folder` after verify_model_folder (a version) or verify_export (a training export); ServingError (one line,
    naming the file) when a file differs from its seal."""
    from kaleido.train.plan import verify_export

    try:
        verify_model_folder(folder, label)
        verify_export(folder)
    except IntegrityError as exc:
        raise ServingError(str(exc)) from None
    return folder


def params_for_model(params: Params, folder: Path) -> Params:
    """`params` pointed at a model folder: its DiT weights (and LoRA adapter), its own assets, and the architecture
    settings it was trained with (R-RoPE variant and offset, text length: the weights only work with those)."""
    local = params.model_copy(deep=True)
    local.model.checkpoint, lora = model_weights(folder, params.platform.mlflow_tracking_uri or None)
    if lora is not None:
        if params.model.lora is not None:
            raise ServingError(f"{folder} is a LoRA version and model.lora (--lora) adds {params.model.lora}: one "
                               "adapter at a time; merge one first (`kaleido merge-lora`)")
        local.model.lora = lora
        local.model.lora_scale = float((read_model_config(folder).get("lora") or {}).get("scale", 1.0))
    for part, path in local_assets(folder, params.platform.mlflow_tracking_uri or None).items():
        setattr(local.model, part, path)
    config = read_model_config(folder)
    if config:
        local.model.rope.variant = config["rope_variant"]
        local.model.rope.offset = int(config["rope_offset"])
        local.model.text_len = int(config["text_len"])
    return local
