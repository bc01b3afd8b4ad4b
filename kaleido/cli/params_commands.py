"""`kaleido params`: validate and print the resolved parameters."""

from __future__ import annotations

import json

import typer

from kaleido.cli.app import ParamsOption, app, read_params
from kaleido.config import params_hash


@app.command("params")
def show_params(params: ParamsOption = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Validate params.yaml and print every knob with its resolved value."""
    loaded = read_params(params)
    dumped = loaded.model_dump(mode="json")
    if as_json:
        typer.echo(json.dumps(dumped, indent=2))
        return
    import yaml

    typer.echo(yaml.safe_dump(dumped, sort_keys=False).rstrip())
    typer.echo(f"# params hash: {params_hash(loaded)}")
