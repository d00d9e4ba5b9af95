"""Options that several command groups share, defined once."""

from __future__ import annotations

from pathlib import Path

import click

from meterproof.config import stack_env_file

stack_env_option = click.option(
    "--stack-env",
    type=click.Path(dir_okay=False, path_type=Path),
    default=stack_env_file,
    show_default=".run/stack.env, or $METERPROOF_STACK_ENV",
    help="The running stack's addresses (broker, PKI folder, database); if the file is "
    "absent there is no running stack. METERPROOF_* variables win over it.",
)
