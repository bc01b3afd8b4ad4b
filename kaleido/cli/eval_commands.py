"""`kaleido evaluate`, `kaleido gate`, `kaleido eval-set init|check` and `kaleido init-tiny-eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kaleido.cli.app import ParamsOption, app, fail, read_params, require_tracking

if TYPE_CHECKING:
    from kaleido.eval.run import EvalSummary

eval_set_app = typer.Typer(help="Evaluation sets: write the built-in one, validate yours.", no_args_is_help=True)
app.add_typer(eval_set_app, name="eval-set")


@eval_set_app.command("init")
def eval_set_init(
    folder: Annotated[Path, typer.Argument(help="folder to write evalset.yaml and images/ into")],
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing evalset.yaml")] = False,
) -> None:
    """Write the built-in eval set (scikit-image photographs: a person, a cat, two objects, one pair)."""
    from kaleido.eval.evalset import EvalSetError, init_builtin

    try:
        spec = init_builtin(folder, force=force)
    except EvalSetError as exc:
        fail(str(exc))
    typer.echo(f"eval set written: {spec}")


@eval_set_app.command("check")
def eval_set_check(
    folder: Annotated[Path | None, typer.Argument(help="eval-set folder (default: eval.eval_set)")] = None,
    params: ParamsOption = None,
) -> None:
    """Validate an eval set (paths, images, categories, reference counts) and summarise it."""
    from kaleido.eval.evalset import EvalSetError, load_eval_set

    loaded = read_params(params)
    target = folder if folder is not None else loaded.resolve(loaded.eval.eval_set)
    try:
        evalset = load_eval_set(target, loaded.model.max_references, loaded.eval.seed, loaded.media.max_image_pixels)
    except EvalSetError as exc:
        fail(str(exc))
    counts = ", ".join(f"{name} {count}" for name, count in evalset.categories().items())
    typer.echo(f"{evalset.name}: {len(evalset.cases)} cases ({counts}); fingerprint {evalset.fingerprint()}")


@app.command("evaluate")
def evaluate(
    model: Annotated[str, typer.Option("--model", help="local DiT checkpoint, or models:/<name>/<N> | @<alias>")],
    out: Annotated[Path, typer.Option("--out", help="output folder (re-runs resume in it)")],
    eval_set: Annotated[
        Path | None, typer.Option("--eval-set", help="eval-set folder (default: eval.eval_set)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu)")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="regenerate and rescore every case")] = False,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not log to MLflow")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    params: ParamsOption = None,
) -> None:
    """Generate every eval case, compute all metrics, write metrics.json + report.html, log to MLflow.

    Exit 2 with an `error:` line when it cannot run (a bad eval set, a truncated weight file, a full disk, another
    evaluation writing into --out) or when the MLflow server stopped answering: then metrics.json and the report are
    complete on disk (the summary is printed) and a re-run only logs them."""
    from kaleido.eval.evalset import EvalSetError
    from kaleido.eval.run import EvalError, EvalNotLogged
    from kaleido.eval.run import evaluate as run_evaluation

    loaded = read_params(params)
    if not no_mlflow or model.startswith("models:/"):
        require_tracking(loaded)
    try:
        summary = run_evaluation(
            loaded, model, eval_set, out, device=device, fresh=fresh, log_mlflow=not no_mlflow, progress=not quiet,
            echo=lambda line: typer.echo(line, err=True),
        )
    except EvalNotLogged as exc:
        _print_summary(exc.summary)
        fail(str(exc))
        raise  # unreachable, for type checkers
    except (EvalError, EvalSetError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers
    _print_summary(summary)


def _print_summary(summary: EvalSummary) -> None:
    """The machine-readable result on stdout (the flow reads the last JSON object)."""
    typer.echo(json.dumps({
        "metrics": str(summary.metrics_path),
        "report": str(summary.report_path),
        "generated": summary.generated,
        "skipped": summary.skipped,
        "mlflow_run_id": summary.mlflow_run_id,
        "overall": summary.document["overall"],
    }, indent=2))


@app.command("gate")
def gate(
    candidate: Annotated[
        str, typer.Option("--candidate", help="models:/<name>/<N>, or a metrics.json (or its folder)")
    ],
    baseline: Annotated[
        str | None,
        typer.Option("--baseline", help="models:/<name>@champion (default), models:/<name>/<N> or a metrics.json"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="also write the decision as JSON here")] = None,
    no_record: Annotated[bool, typer.Option("--no-record", help="do not write the decision to MLflow tags")] = False,
    params: ParamsOption = None,
) -> None:
    """Pass/fail a candidate against the floors and the champion; exit 0 pass, 1 fail, 2 cannot decide."""
    from kaleido.eval.gate import GateError, run_gate

    loaded = read_params(params)
    registry_refs = [ref for ref in (candidate, baseline) if ref and ref.startswith("models:/")]
    if not no_record or registry_refs or baseline is None:
        require_tracking(loaded)
    try:
        decision = run_gate(loaded, candidate, baseline, record=not no_record)
    except GateError as exc:
        fail(str(exc), code=2)
    verdict = "PASS" if decision.passed else "FAIL"
    typer.echo(f"gate {verdict}: {decision.candidate}" + (f" vs {decision.baseline}" if decision.baseline else ""))
    for metric, reason in decision.reasons().items():
        typer.echo(f"  {metric}: {reason}")
    for note in decision.notes:
        typer.echo(f"  note: {note}")
    typer.echo(f"  rule: {decision.rule}")
    if out is not None:
        from kaleido.platform.files import write_text_atomic

        write_text_atomic(out, json.dumps(decision.to_dict(), indent=2) + "\n")
    raise typer.Exit(0 if decision.passed else 1)


@app.command("init-tiny-eval")
def init_tiny_eval(
    out_dir: Annotated[
        Path | None,
        typer.Argument(help="folder for the tiny metric backbones (default: the folder of eval.models.dino)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the random weights")] = 0,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if complete")] = False,
    params: ParamsOption = None,
) -> None:
    """Write random-weight tiny DINO, MUSIQ and aesthetic head (and the tiny Grounding DINO, SAM, CLIP they
    pair with, at data.models) so `kaleido evaluate` runs offline on a laptop. Scores are meaningless."""
    from kaleido.eval.tiny import build_tiny_eval_models
    from kaleido.vision.tiny import build_tiny_vision_models

    loaded = read_params(params)
    if out_dir is None:
        dino = loaded.resolve(loaded.eval.models.dino)
        if dino is None:
            fail("eval.models.dino is not set in params.yaml; pass OUT_DIR")
        out_dir = dino.parent
    vision = loaded.resolve(loaded.data.models.clip)
    if vision is not None:
        built = build_tiny_vision_models(vision.parent, seed=seed, parts=["grounding_dino", "sam", "clip"])
        for key, path in built.items():
            typer.echo(f"  {key}: {path}")
    for key, path in build_tiny_eval_models(out_dir, seed=seed, force=force).items():
        typer.echo(f"  {key}: {path}")
