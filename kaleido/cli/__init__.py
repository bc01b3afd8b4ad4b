"""The `kaleido` command line. Each sub-module registers its commands on `app`.

Heavy libraries are imported inside the commands so that `kaleido --help` stays fast.
"""

from kaleido.cli import checkpoint_commands, generate_commands, params_commands  # noqa: F401  (registration)
from kaleido.cli.app import app

__all__ = ["app"]
