"""The frame of every command line: how a script starts (``run_script``), its parser and help layout, the check
of a count option, and how it ends when it cannot go on (one line on stderr and an exit status)."""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
import threading

from tqdm import tqdm

from spatial_attention.common.errors import DataError, OptionError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks. A default of None means "not given": its help
    says what happens then, so no "(default: None)" is added."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A script's parser: its name, its description (line breaks kept), every option's default shown."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def check_at_least(minimum: int, **options: int | None) -> None:
    """OptionError for the first option (given as name=value; None = not given) below ``minimum``."""
    for name, value in options.items():
        if value is not None and value < minimum:
            need = "at least 1" if minimum == 1 else f"{minimum} or more"
            raise OptionError(f"--{name.replace('_', '-')} {value}: must be {need}")


def user_errors_exit(main):
    """Decorator: how a script ends when it cannot go on, always in one line on stderr.

    - OptionError / DataError: the message, exit status 2;
    - OSError (a disk that is full or turned read-only, a file that vanished):
      the file and the reason, exit status 1;
    - Ctrl-C or SIGTERM: what was kept and how to resume, exit status 130.

    A run.json still saying "running" is rewritten "interrupted" or "failed"
    (``runio.mark_unfinished``); every finished result line stays on disk, and
    rerunning the same command resumes after them.
    """

    def say(line: str) -> None:
        tqdm.write(line, file=sys.stderr)  # on a line of its own, below any progress bar

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from spatial_attention.common.runio import mark_unfinished, release_outputs

        # SIGTERM (kill, timeout, a cluster's time limit) ends a run like Ctrl-C does
        in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
        try:
            return main(*args, **kwargs)
        except (OptionError, DataError) as err:
            mark_unfinished("failed", str(err))
            say(f"error: {err}")
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            say(f"interrupted: {mark_unfinished('interrupted', 'Ctrl-C')}")
            raise SystemExit(130) from None
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            line = f"{where}{err.strerror or err}"
            say(f"error: cannot go on: {line} (fix the disk or permissions); {mark_unfinished('failed', line)}")
            raise SystemExit(1) from None
        except Exception as err:  # a bug or, say, GPU memory: the traceback stays, run.json says how it ended
            mark_unfinished("failed", f"{type(err).__name__}: {str(err)[:200]}")
            raise
        finally:
            release_outputs()
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


STOPPED_STARTING = "interrupted: stopped while starting, before any work; nothing was written"


def _stopped_while_starting(signum, frame) -> None:
    """SIGTERM during the imports: nothing is written yet, so the process ends at once, in one line. Raising
    KeyboardInterrupt there instead can land inside an extension's initialisation (pybind11), which then
    aborts the process (exit -6, a C++ message)."""
    os.write(2, (STOPPED_STARTING + "\n").encode())
    os._exit(130)


def run_script(module: str, *args) -> None:
    """A top-level script's whole run: ``module``'s ``main(*args)``, its return value the exit status.

    SIGTERM is handled from here on, before the slow imports (torch, transformers: seconds), so that a script
    stopped while it starts ends like one stopped later: one line and exit status 130, not a silent 143. Once
    imported, SIGTERM is taken as Ctrl-C, which the scripts turn into a recorded, resumable stop.
    """
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        tqdm.write(STOPPED_STARTING, file=sys.stderr)
        raise SystemExit(130) from None
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main(*args))


def duration(seconds: float) -> str:
    """``seconds`` as the study's lines write a duration: 1h05m from an hour on, else 4m07s."""
    seconds = int(round(seconds))
    hours, minutes = f"{seconds // 3600}h{seconds % 3600 // 60:02d}m", f"{seconds // 60}m{seconds % 60:02d}s"
    return hours if seconds >= 3600 else minutes
