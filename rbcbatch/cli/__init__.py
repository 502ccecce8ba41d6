"""The `rbcbatch` command."""

from rbcbatch.cli.main import app

__all__ = ["app"]
