#!/usr/bin/env python
"""The one CLI, from a source checkout: the same as the installed ``threestudio-mv`` command.

    python launch.py --config configs/mvdream.yaml --train --export system.prompt_processor.prompt="a blue mug"

See ``python launch.py --help`` (threestudio_mv/launch.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout, when not pip-installed

from threestudio_mv.launch import cli  # noqa: E402

if __name__ == "__main__":
    cli()
