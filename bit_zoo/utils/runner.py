"""Running a command-line entry point: bad input is one line and exit 2, never a traceback.

train.py, validate.py, the ``python -m bit_zoo.<tool>`` commands and the benchmarks wrap their
main(argv) in :func:`run_cli`. Kept apart from everything that builds models or data, so that a
tool imports only what it uses.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from typing import Any

from ..errors import FetchError, TrainingInterrupted, TrainingStopped
from .remote import UploadError

__all__ = ["run_cli", "one_line", "resume_command", "EXIT_BAD_INPUT", "EXIT_STOPPED", "EXIT_UPLOAD"]

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_UPLOAD = 4


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:  # e.g. a symlink loop or a permission error
        text = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{text}. Fix the path or its permissions, or point the option at another location"
    return " ".join(str(e).split())


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None, *, prog: str) -> int:
    """Run a script's main(argv): bad input prints one line and exits 2; a stopped training exits 3;
    outputs that could not be uploaded to a remote output_dir exit 4 (they are kept locally); a
    training stopped by SIGTERM/SIGINT exits 128 + the signal, as a process killed by it would."""
    try:
        code = main(argv)
    except TrainingInterrupted as e:  # a resumable checkpoint was saved: say how to continue
        resume = f"; continue with: {resume_command(prog, sys.argv[1:] if argv is None else argv)}" if e.checkpoint else ""
        print(f"{prog}: stopped: {one_line(e)}{resume}", file=sys.stderr)
        return 128 + e.signum
    except TrainingStopped as e:
        print(f"{prog}: stopped: {one_line(e)}", file=sys.stderr)
        return EXIT_STOPPED
    except UploadError as e:  # the run finished; its outputs are complete in the local copy the message names
        print(f"{prog}: upload failed: {one_line(e)}", file=sys.stderr)
        return EXIT_UPLOAD
    # ConfigError is a ValueError; FileNotFoundError, PermissionError are OSErrors; FetchError: an unreachable
    # download or remote store (RemoteError among them), nothing was written
    except (ValueError, OSError, FetchError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return code if isinstance(code, int) else 0  # train.main returns its summary


def resume_command(prog: str, argv: list[str]) -> str:
    """The command that continues a run: the same arguments with --resume auto (any other --resume dropped)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    return shlex.join(["python", prog, *args, "--resume", "auto"])
