"""Running a trial as a subprocess of the CLI, and reading what it says: one place for every caller
(the text-to-3D and MVDreamBooth evaluations, MVDreamBooth's chained 3D stage)."""
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


def slug(text: str) -> str:
    """A folder-name-safe version of a prompt or path (how the CLI names trials)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip()).strip("_")[:80] or "default"


def launch_command(*arguments: str) -> List[str]:
    """The CLI's command line (``python -m threestudio_mv.launch ...``): works from a source checkout and
    from an installed package alike."""
    return [sys.executable, "-m", "threestudio_mv.launch", *arguments]


@dataclass
class TrialRun:
    """What a finished CLI run printed: its exit code, trial folder and exported files by kind."""

    returncode: int
    trial_dir: Optional[Path]
    exports: Dict[str, Path] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""

    @property
    def export_dir(self) -> Optional[Path]:
        """The folder of the exported mesh (the last stage's, for a staged trial)."""
        return next(iter(self.exports.values())).parent if self.exports else None


def parse_output(stdout: str) -> Dict[str, Any]:
    """The trial folder (the last ``trial folder:`` line: the whole trial's, for a staged one) and the
    ``exported <kind>: <path>`` lines of the CLI's standard output."""
    folders = re.findall(r"^trial folder: (.+)$", stdout, flags=re.MULTILINE)
    exports = {kind: Path(path) for kind, path in re.findall(r"^exported (\w+): (.+)$", stdout, flags=re.MULTILINE)}
    return {"trial_dir": Path(folders[-1]) if folders else None, "exports": exports}


def thread_env(threads: int) -> Dict[str, str]:
    """This process's environment with torch's CPU threads set to ``threads`` (trials run side by side)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_trial(arguments: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
              stderr: Any = subprocess.PIPE) -> TrialRun:
    """Run the CLI with ``arguments``; standard output is captured (it names the results), standard
    error is captured unless given (e.g. None shows the progress bar live)."""
    result = subprocess.run(launch_command(*arguments), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    parsed = parse_output(result.stdout)
    return TrialRun(result.returncode, parsed["trial_dir"], parsed["exports"], result.stdout, result.stderr or "")
