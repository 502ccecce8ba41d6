"""The `rbcbatch` command: the run-time commands (cli.main), then the development ones (cli.dev)."""

from rbcbatch.cli.main import app  # noqa: I001 - the order below is wanted

# Registered after the run-time commands, so that `rbcbatch --help` lists them last.
from rbcbatch.cli import dev as _dev  # noqa: F401

__all__ = ["app"]
