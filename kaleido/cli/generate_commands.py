"""`kaleido generate` (subject-to-video sampling) and `kaleido init-tiny` (offline tiny assets)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaleido.cli.app import ParamsOption, app, fail, read_params


@app.command("generate")
def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="what the video shows")],
    out: Annotated[Path, typer.Option("--out", help="output .mp4; a contact sheet .png is written beside it")],
    ref: Annotated[
        list[Path] | None, typer.Option("--ref", help="reference image (repeat for several subjects)")
    ] = None,
    frames: Annotated[int | None, typer.Option(help="pixel frames, 4k+1 (default: generate.frames)")] = None,
    height: Annotated[int | None, typer.Option(help="multiple of 16 (default: generate.height)")] = None,
    width: Annotated[int | None, typer.Option(help="multiple of 16 (default: generate.width)")] = None,
    steps: Annotated[int | None, typer.Option(help="sampling steps (default: generate.steps)")] = None,
    seed: Annotated[int | None, typer.Option(help="noise seed (default: generate.seed)")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option("--guidance-scale", help="text CFG scale (default: generate.guidance_scale)")
    ] = None,
    shift: Annotated[float | None, typer.Option(help="sigma shift (default: generate.shift)")] = None,
    sampler: Annotated[str | None, typer.Option(help="euler | unipc (default: generate.sampler)")] = None,
    negative_prompt: Annotated[
        str | None, typer.Option("--negative-prompt", help="unconditional prompt (default: generate.negative_prompt)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu)")] = None,
    text_encoder_device: Annotated[
        str | None, typer.Option("--text-encoder-device", help="auto | cpu: umT5 off the GPU, Wan's --t5_cpu "
                                 "(default: generate.text_encoder_device)"),
    ] = None,
    release_encoders: Annotated[
        bool | None, typer.Option("--release-encoders/--keep-encoders", help="move the text encoder and VAE off "
                                  "the GPU while the DiT samples (default: generate.release_encoders)"),
    ] = None,
    offload: Annotated[
        str | None, typer.Option(help="none | blocks: DiT blocks on the CPU, one at a time on the GPU "
                                 "(default: generate.offload)"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="models:/<name>@<alias> or models:/<name>/<version> (downloaded once and "
                     "cached), or a local model folder / checkpoint (default: model.checkpoint of params.yaml)"),
    ] = None,
    lora: Annotated[
        Path | None, typer.Option("--lora", help="LoRA adapter merged into the DiT: peft folder, diffusers or "
                                  "Wan/ComfyUI .safetensors (default: model.lora)"),
    ] = None,
    lora_scale: Annotated[
        float | None, typer.Option("--lora-scale", help="multiplier on the adapter (default: model.lora_scale)")
    ] = None,
    params: ParamsOption = None,
) -> None:
    """Generate a video of the referenced subjects following the prompt.

    Memory options (generate.* in params.yaml): text_encoder_device cpu (Wan's --t5_cpu), release_encoders,
    offload blocks. Several GPUs: `torchrun --nproc-per-node N $(which kaleido) generate ...` samples with
    Ulysses sequence parallelism (rank 0 writes the video).
    """
    # Every number is validated by the params schema (ranges in the message) before any model loads.
    loaded = read_params(params, {
        "generate.frames": frames, "generate.height": height, "generate.width": width, "generate.steps": steps,
        "generate.guidance_scale": guidance_scale, "generate.shift": shift, "generate.sampler": sampler,
        "generate.seed": seed, "generate.negative_prompt": negative_prompt,
        "generate.text_encoder_device": text_encoder_device, "generate.release_encoders": release_encoders,
        "generate.offload": offload, "model.lora": str(lora.resolve()) if lora else None,
        "model.lora_scale": lora_scale,
    })
    g = loaded.generate
    if lora_scale is not None and loaded.model.lora is None and model is None:
        fail("--lora-scale scales an adapter: give --lora (or model.lora in params.yaml)")
    if out.suffix.lower() != ".mp4":
        fail(f"--out {out}: must end in .mp4 (an H.264 mp4 is written)")
    if not prompt.strip():
        fail("--prompt is empty; describe the video to generate")

    # Validate everything cheap (sizes, reference files, prompt length) BEFORE loading any model.
    from kaleido.model.generate import GenerationSettings, check_prompts, validate_request
    from kaleido.request_limits import LimitError, Limits, check_image_bytes, check_request

    request = GenerationSettings.from_params(loaded)
    limits = Limits.from_params(loaded)  # the same cost model and limits as `kaleido serve` (serve.* in params.yaml)
    try:
        check_request(limits, prompt, request.negative_prompt, request.frames, request.height, request.width,
                      request.steps, request.guidance_scale, len(ref or []))
        for path in ref or []:
            if path.is_file():
                check_image_bytes(f"--ref {path}", path.stat().st_size, limits)
    except LimitError as exc:
        fail(str(exc))
    try:
        images = validate_request(
            ref or [], request.frames, request.height, request.width,
            loaded.model.max_references, request.steps, request.sampler, loaded.media.max_image_pixels,
        )
        check_prompts(loaded, [("--prompt", prompt), ("the negative prompt", request.negative_prompt)])
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))

    from kaleido.model.generate import NumericalError, S2VPipeline
    from kaleido.model.media import contact_sheet, write_video
    from kaleido.serving import ServingError, params_for_model, resolve_model

    label = None
    if model is not None:
        try:
            folder, label = resolve_model(model, loaded.platform.mlflow_tracking_uri, echo=typer.echo)
            loaded = params_for_model(loaded, folder)
        except ServingError as exc:
            fail(str(exc))
    distributed = _sequence_parallel_group()
    try:
        pipe = S2VPipeline.from_params(loaded, device=device or (distributed.device if distributed else None))
        if distributed is not None:
            distributed.attach(pipe)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    settings = request.call_kwargs()
    if distributed is not None:
        settings["seed"] = distributed.shared_seed(request.seed)
    try:
        video = pipe(prompt, images, warn_truncation=False, **settings)
    except (ValueError, NumericalError) as exc:
        fail(str(exc))
    if distributed is not None and not distributed.is_main:
        return  # every rank sampled the same video; rank 0 writes it
    metadata = request.metadata(prompt, [str(r) for r in ref or []], seed=pipe.last_seed)
    video_path = write_video(video, out, fps=g.fps, metadata=metadata)
    sheet_path = contact_sheet(video, out.with_suffix(".png"))
    if label:
        typer.echo(f"model: {label}")
    typer.echo(f"placement: {pipe.placement()}" + (f"; Ulysses over {distributed.world} ranks" if distributed else ""))
    typer.echo(f"video: {video_path}")
    typer.echo(f"contact sheet: {sheet_path}")
    typer.echo(f"seed: {pipe.last_seed}" + (" (drawn at random for --seed -1)" if request.seed == -1 else ""))


def _sequence_parallel_group():
    """Under torchrun (WORLD_SIZE > 1): one Ulysses group over every rank, else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from kaleido.model.generate import SequenceParallelGeneration

    return SequenceParallelGeneration.from_environment()


@app.command("init-tiny")
def init_tiny(
    out_dir: Annotated[
        Path | None,
        typer.Argument(help="folder to write (default: the parent folder of model.checkpoint in params.yaml)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the random weights and the tokenizer corpus")] = 0,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if the folder is complete")] = False,
    params: ParamsOption = None,
) -> None:
    """Write random-weight tiny models in their real formats (offline).

    DiT, VAE, text encoder and tokenizer go to OUT_DIR; the curation/evaluation models (Grounding DINO,
    SAM, CLIP, FLUX fill/redux) to OUT_DIR/vision.
    """
    if out_dir is None:
        loaded = read_params(params)
        checkpoint = loaded.resolve(loaded.model.checkpoint)
        if checkpoint is None:
            fail("model.checkpoint is not set in params.yaml; pass OUT_DIR")
        out_dir = checkpoint.parent
    from kaleido.model.tiny import build_tiny_assets, tiny_assets_complete

    existed = tiny_assets_complete(out_dir, seed) and not force
    path = build_tiny_assets(out_dir, seed=seed, force=force)
    typer.echo(f"tiny assets {'already complete' if existed else 'written'}: {path}")
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        typer.echo(f"  {part}: {path / part}")
    from kaleido.vision.tiny import build_tiny_vision_models

    for name, vision_path in build_tiny_vision_models(path / "vision", seed=seed, force=force).items():
        typer.echo(f"  {name}: {vision_path}")
