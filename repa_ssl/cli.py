"""What the project's commands share on the command line."""
from __future__ import annotations

import argparse
from typing import Optional

__all__ = ["HelpFormatter", "positive_int"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default in its help.

    Left out where it would say nothing or mislead: flags (``store_true``/``store_false``), ``None``
    defaults, and helps that already tell the default in words.
    """

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def positive_int(value: str) -> int:
    """``type=`` for counts that must be at least 1; argparse turns the error into a usage message (exit 2)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (at least 1), got {value}")
    return number
