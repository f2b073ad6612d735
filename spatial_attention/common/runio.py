"""Output plumbing shared by every experiment: logging, append-as-you-go JSONL,
atomic summaries, ``run.json`` and the lock that keeps a results folder to one
run (the run loop itself is ``runloop.py``).

Guarantees a researcher relies on: a result line is on disk (flushed and
fsynced) as soon as its item finishes; a summary file is either the old one or
the new one, never half written; a rerun with the same output folder skips
what is already there.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from spatial_attention.common.errors import DataError, OptionError, UnreadableFile
from spatial_attention.stats.inference import json_safe

log = logging.getLogger("spatial_attention")

PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "numpy", "matplotlib", "pillow", "tqdm",
            "qwen-vl-utils")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "huggingface_hub", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` through a temporary file and a rename.
    The file gets the mode a plain ``open`` would give (0666 less the umask), not
    mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # named by the file meant, not the temporary one
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """Atomic JSON write; NaN and infinities become null."""
    write_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def append_jsonl(path: Path, obj) -> None:
    """Append one JSON line and make sure it is on disk before returning."""
    line = json.dumps(json_safe(obj), allow_nan=False)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path):
    """The JSON document in ``path``; None where there is no such file. UnreadableFile where there is one that
    cannot be used (not readable, not UTF-8, not JSON: cut off or damaged), so that a damaged file is never
    taken for a missing one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UnreadableFile(path, err.strerror or str(err)) from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UnreadableFile(path, "not UTF-8 text") from None
    except ValueError as err:
        raise UnreadableFile(path, f"not valid JSON, damaged or cut off ({err})") from None


RecordCheck = Callable[[object], "str | None"]  # a parsed line -> why it is not a result record, or None


def lacks_keys(*keys: str) -> RecordCheck:
    """A record check: the line must be a JSON object holding ``keys``."""
    def problem(record) -> str | None:
        missing = [k for k in keys if k not in record] if isinstance(record, dict) else None
        return "not a JSON object" if missing is None else (f"lacks {', '.join(missing)}" if missing else None)

    return problem


def read_jsonl(path: Path, check: RecordCheck | None = None, repair: bool = True) -> Iterator[dict]:
    """Stream the complete lines of a JSONL file; a torn last line (a killed run) is cut off
    with a warning, so that it is redone (``repair=False``: only skipped, for a reader that does
    not own the file, which another run may be appending to). A line that is JSON but that
    ``check`` finds is no result record is a DataError naming the line."""
    for _, record in read_jsonl_at(path, check, repair):
        yield record


def read_jsonl_at(path: Path, check: RecordCheck | None = None, repair: bool = True) -> Iterator[tuple[int, dict]]:
    """``read_jsonl`` with each record's byte offset in the file."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:  # bytes: offsets for the truncation, and foreign bytes are a bad line
        offset, number, pending = 0, 0, None
        for line in f:
            if pending is not None:  # a bad line with more after it: not a torn tail
                raise DataError(f"{path}, line {number}: not a JSON record, and complete records follow it, so it "
                                f"is not an interrupted last line; delete that line to keep the rest and resume, "
                                f"or use another output folder")
            number += 1
            if line.strip():
                try:
                    record = json.loads(line.decode("utf-8"))
                except ValueError:  # not JSON, or not UTF-8
                    pending = offset
                    continue
                problem = check(record) if check else None
                if problem:
                    raise DataError(f"{path}, line {number}: not a result record here ({problem}); delete that "
                                    f"line to redo its item, or use another output folder")
                yield offset, record
            offset += len(line)
    if pending is not None and repair:
        log.warning("%s: dropping an incomplete last line (interrupted run); it will be redone", path)
        _truncate_to(path, pending)


def _truncate_to(path: Path, n_bytes: int) -> None:
    with open(path, "rb+") as f:
        f.truncate(n_bytes)


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_output_dir(path: Path, option: str) -> Path:
    """Make sure results can be written to the folder ``path`` before any model loads;
    OptionError naming ``option`` otherwise. Nothing is left behind: a missing folder is
    judged by its nearest existing parent, where a probe file is made and removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"{option} {path}: is a file, not a folder; choose a folder for the results")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise OptionError(f"{option} {path}: {existing} is a file, so no folder can be made there; choose another")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OptionError(f"{option} {path}: cannot write there ({err.strerror}); choose a writable folder") from None
    return path


def run_record(settings: dict, adapter=None, **extra) -> dict:
    """What ``run.json`` holds: the command (shell-quoted, to paste back), every setting
    (the command's options, ``vars(args)``), the model, versions."""
    record = {"command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
              "versions": package_versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if adapter is not None:
        record["model"] = adapter.describe()
    record.update(extra)
    return record


# --- one run per folder -----------------------------------------------------------------

LOCK_FILE = ".lock"
# folder -> (its open lock file, the outermost folder this process made for it, or None where it was there)
_LOCKS: dict[Path, tuple[int, Path | None]] = {}


def claim_output(out: Path, option: str) -> None:
    """Make ``out`` (created if missing) this process's: OptionError naming ``option`` when another
    run holds it. Two runs appending to one folder would write each item twice."""
    out = Path(out)
    key = out.resolve()
    if key in _LOCKS:
        return
    made = next((p for p in reversed((key, *key.parents)) if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OptionError(f"{option} {out}: another run (process {holder}) is writing there now; wait for it to "
                          f"finish, or choose another {option}") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[key] = (fd, made)


def lock_descriptor(out: Path) -> int:
    """The file descriptor of this process's lock on ``out`` (claimed with ``claim_output``): a child started with
    it (``subprocess.Popen(pass_fds=...)``) holds the lock as long as it or any process it starts lives."""
    return _LOCKS[Path(out).resolve()][0]


def release_outputs() -> None:
    """Free every folder this process claimed (``user_errors_exit`` does it when a command ends, however it
    ends; the system does it when a process dies). A folder this process made that holds nothing but the
    lock (a run refused before it wrote anything) is removed, and so are the folders it made above it that
    are left empty (``out/discovery`` of a refused run: ``out`` too)."""
    while _LOCKS:  # the last claimed first: a folder claimed inside another is emptied before it
        folder, (fd, made) = _LOCKS.popitem()
        if made and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()
            for empty in (folder, *folder.parents):
                if any(empty.iterdir()):
                    break
                empty.rmdir()
                if empty == made:
                    break
        os.close(fd)


# run.json files of runs in progress in this process, and whether a rerun resumes them: if
# the run ends in an exception, ``mark_unfinished`` records how it ended there, so that no
# run.json says "running" forever.
_RUNNING: dict[Path, tuple[dict, bool]] = {}


def start_run(path: Path, record: dict, resumable: bool = True) -> None:
    """Write ``record`` with status "running" to the run.json ``path``; ``resumable``: whether
    its results are appended as they finish, so that a rerun goes on from them."""
    record = {**record, "status": "running"}
    write_json(path, record)
    _RUNNING[Path(path)] = (record, resumable)


def finish_run(path: Path, record: dict) -> None:
    """Write ``record`` with status "finished" to the run.json ``path``."""
    _RUNNING.pop(Path(path), None)
    write_json(path, {**record, "status": "finished"})


def mark_unfinished(status: str, reason: str) -> str:
    """Rewrite every run.json still "running" with ``status`` ("interrupted", "failed") and
    ``reason``; returns what the user is told was kept and how to go on."""
    kept, lost = [], []
    for path, (record, resumable) in list(_RUNNING.items()):
        ended = {**record, "status": status, "ended_because": reason, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            write_json(path, ended)
        except OSError:  # a folder turned read-only: the file itself may still be writable
            try:
                path.write_text(json.dumps(json_safe(ended), indent=2, allow_nan=False) + "\n")
            except OSError:
                pass
        (kept if resumable else lost).append(str(path.parent))
        _RUNNING.pop(path, None)
    if kept:
        return f"finished results are kept in {', '.join(kept)}; rerun the same command to resume"
    if lost:
        return f"{', '.join(lost)} keeps no partial results (run.json says how the run ended); a rerun starts over"
    return "no results had been written yet"
