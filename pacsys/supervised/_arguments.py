"""The commands' argument parser: argparse's, with a did-you-mean for a mistyped option.

The config file and the `PACSYS_SUPERVISOR_*` variables name the setting an unknown key was
probably meant to be; a mistyped option (`--wokers 4`) says so too.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

__all__ = ["ArgumentParser"]


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose "unrecognized arguments" error suggests the closest option."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._did_you_mean(extras)}")
        return parsed

    def _did_you_mean(self, extras: list[str]) -> str:
        options = [name for action in self._actions for name in action.option_strings if name.startswith("--")]
        for word in extras:
            if word.startswith("--"):
                close = difflib.get_close_matches(word.partition("=")[0], options, n=1)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""
