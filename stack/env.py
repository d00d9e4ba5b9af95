"""Transitional: the stack's addresses moved to `meterproof.config`."""

from meterproof.config import (
    DEFAULT_RUN_DIR,
    SHARE_GROUP_PATTERN,
    STACK_ENV_FILE,
    StackEnv,
    new_share_group,
)

__all__ = [
    "DEFAULT_RUN_DIR",
    "SHARE_GROUP_PATTERN",
    "STACK_ENV_FILE",
    "StackEnv",
    "new_share_group",
]
