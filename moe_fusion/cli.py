"""The `moe-fusion` command: argument parsing and printing only; the work lives in the Python API."""

from __future__ import annotations

import click

from moe_fusion import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moe-fusion")
def main() -> None:
    """Find, fuse, verify and lower Mixture-of-Experts layers in OpenVINO models."""
