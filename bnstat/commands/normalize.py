"""bnstat normalize (in progress)."""

from __future__ import annotations

import click


@click.command("normalize")
def command():
    """Normalize arrays as BN / LayerNorm / InstanceNorm / GroupNorm would."""
    raise click.UsageError("normalize is not available yet")
