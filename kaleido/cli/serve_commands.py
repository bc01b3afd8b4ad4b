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
    import uvicorn

    from kaleido.platform.integrity import IntegrityError
    from kaleido.serve_app import build_app
    from kaleido.serving import ServingError

    try:
        application = build_app(uri, loaded)
    except (ServingError, IntegrityError) as exc:
        fail(f"--model {uri}: {exc}")
        raise  # unreachable, for type checkers
    except Exception as exc:  # MLflow's: no such model or alias, registry unreachable
        fail(f"--model {uri}: cannot load it ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]})")
        raise
    typer.echo(f"serving {uri} on http://{host}:{port}/invocations (concurrency {loaded.serve.concurrency}, "
               f"timeout {loaded.serve.timeout_s:g} s)", err=True)
    uvicorn.run(application, host=host, port=port, workers=1, log_level="warning", timeout_graceful_shutdown=10)
