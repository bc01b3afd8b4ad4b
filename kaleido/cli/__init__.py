"""The `kaleido` command line. Each sub-module registers its commands on `app`.

Heavy libraries are imported inside the commands so that `kaleido --help` stays fast.
"""

from kaleido.cli import (  # noqa: F401  (registration)
    checkpoint_commands,
    data_commands,
    eval_commands,
    generate_commands,
    params_commands,
    platform_commands,
    registry_commands,
    release_commands,
    samples_commands,
    serve_commands,
    train_commands,
)
from kaleido.cli.app import app

__all__ = ["app"]
