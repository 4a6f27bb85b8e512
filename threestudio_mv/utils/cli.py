"""Subcommands of the command-line tools (``python -m threestudio_mv.nvs train ...``)."""
import importlib
from typing import Mapping, Sequence


def run_subcommand(argv: Sequence[str], subcommands: Mapping[str, str]) -> bool:
    """Run the subcommand ``argv[0]`` names, if ``subcommands`` (name -> ``"module:function"``) has it,
    with the rest of ``argv``; returns whether one ran. The module is imported only then, so that a
    tool's main command does not pay for its subcommands' imports (training code, mostly)."""
    target = subcommands.get(argv[0]) if argv else None
    if target is None:
        return False
    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(list(argv[1:]))
    return True
