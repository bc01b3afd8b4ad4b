"""`kaleido serve`: a registered version as an HTTP endpoint (MLflow's scoring app, bounded: kaleido/serve_app.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from kaleido.cli.app import ParamsOption, app, fail, read_params


@app.command("serve")
def serve(
    model: Annotated[
        str | None, typer.Option("--model", help="models:/<name>@<alias>, models:/<name>/<version> or a local MLflow "
                                 "Model folder (default: models:/<platform.registered_model>@champion)"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 in a pod)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    params: ParamsOption = None,
) -> None:
    """Serve a version: POST /invocations (MLflow's request formats), GET /ping once the model is loaded.

    Bounded by serve.* of params.yaml: request cost limits (400 naming the limit), serve.concurrency generations at
    once (503 + Retry-After beyond), serve.timeout_s per request (504, and the generation stops), one-line errors."""
    import os

    loaded = read_params(params)
    uri = model or f"models:/{loaded.platform.registered_model}@champion"
    if uri.startswith("models:/") and not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = loaded.platform.mlflow_tracking_uri
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    source = ("$MLFLOW_TRACKING_URI" if tracking != loaded.platform.mlflow_tracking_uri
              else "platform.mlflow_tracking_uri")
    down = (f"is the tracking server up? Start it (this machine: `kaleido platform up`; the cluster: "
            f"docs/operations.md) or point {source} at a running one")
    if uri.startswith("models:/"):  # a registry that does not answer is said in seconds, not after MLflow's retries
        from kaleido.platform.services import tracking_problem

        problem = tracking_problem(tracking, timeout=min(10, loaded.platform.mlflow_request_timeout_s))
        if problem is not None:
            fail(f"--model {uri}: the MLflow server at {tracking} ({source}) does not answer ({problem}); {down}")
    import uvicorn

    from kaleido.platform.integrity import IntegrityError
    from kaleido.serve_app import build_app
    from kaleido.serving import ServingError
    from kaleido.train.tracking import mlflow_request_limits, short_error, tracking_failure

    try:
        with mlflow_request_limits(loaded.platform):  # platform.mlflow_request_*: seconds, not MLflow's ~8 minutes
            application = build_app(uri, loaded)
    except (ServingError, IntegrityError) as exc:
        fail(f"--model {uri}: {exc}")
        raise  # unreachable, for type checkers
    except Exception as exc:  # MLflow's: no such model or alias, registry unreachable
        lost = tracking_failure(tracking, "loading the model", exc) if tracking else None
        if lost is not None:
            fail(f"--model {uri}: the MLflow server at {tracking} ({source}) stopped answering while the model "
                 f"loaded ({lost.why}); {down}")
        fail(f"--model {uri}: cannot load it ({short_error(exc)})")
        raise
    typer.echo(f"serving {uri} on http://{host}:{port}/invocations (concurrency {loaded.serve.concurrency}, "
               f"timeout {loaded.serve.timeout_s:g} s)", err=True)
    uvicorn.run(application, host=host, port=port, workers=1, log_level="warning", timeout_graceful_shutdown=10)
