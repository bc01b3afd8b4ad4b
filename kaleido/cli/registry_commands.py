"""`kaleido registry ...`: model versions, promotion and rollback in the MLflow registry."""

from __future__ import annotations

import json

import typer

from kaleido.cli.app import ParamsOption, app, fail, read_params, require_tracking

registry_app = typer.Typer(help="The MLflow model registry: show, promote, roll back.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


def _registry(params_path):
    from kaleido.registry import ModelRegistry

    params = read_params(params_path)
    uri = params.platform.mlflow_tracking_uri
    if not uri:
        fail("platform.mlflow_tracking_uri is empty in params.yaml; set it to the MLflow server's URL")
    # a server that is down fails here in seconds, not after MLflow's minutes of HTTP retries
    require_tracking(params)
    return ModelRegistry(uri, params.platform.registered_model)


@registry_app.command("show")
def show(params: ParamsOption = None) -> None:
    """List the versions with their aliases, gate decisions and lineage."""
    registry = _registry(params)
    champion, previous = registry.alias_version("champion"), registry.alias_version("previous")
    versions = registry.client.search_model_versions(f"name='{registry.name}'")
    if not versions:
        typer.echo(f"{registry.name}: no versions yet")
    for version in sorted(versions, key=lambda v: int(v.version)):
        aliases = [a for a, v in (("champion", champion), ("previous", previous)) if v == str(version.version)]
        tags = dict(version.tags)
        typer.echo(
            f"v{version.version:<4} {','.join(aliases) or '-':<18} gate={tags.get('gate.decision', '-'):<7} "
            f"run={version.run_id} git={tags.get('lineage.git_revision', '-')[:12]}"
        )


@registry_app.command("promote")
def promote(version: str = typer.Argument(..., help="version number or models:/kaleido-s2v/N"),
            params: ParamsOption = None) -> None:
    """Set alias `champion` on a version whose gate passed (the old champion becomes `previous`)."""
    from kaleido.registry import RegistryError

    registry = _registry(params)
    try:
        replaced = registry.promote(registry.resolve(version))
    except RegistryError as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps({"champion": registry.alias_version("champion"), "previous": replaced}))


@registry_app.command("rollback")
def rollback(params: ParamsOption = None) -> None:
    """Give `champion` back to the version it replaced."""
    from kaleido.registry import RegistryError

    registry = _registry(params)
    try:
        restored, notes = registry.rollback()
    except RegistryError as exc:
        fail(str(exc), code=1)
    for note in notes:
        typer.secho(f"warning: skipped {note}", fg=typer.colors.YELLOW, err=True)
    typer.echo(json.dumps({"champion": restored, "previous": registry.alias_version("previous")}))
