"""The one family of errors a user can cause. Every fault of input or environment that osp can name raises a
subclass of `OspError` whose message says what is wrong and what to do; each command catches `OspError` and
prints that message on one line (`osp <command>: error: ...`), never a traceback.

The subclasses also derive from the built-in error they refine (ValueError, RuntimeError), so code that
catches those keeps working.
"""

from __future__ import annotations

import errno
import os


class OspError(Exception):
    """A fault of input or environment, with a message that says what to do."""


class ConfigError(OspError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or incompatible with another one."""


class QuantConfigError(ConfigError):
    """A quantization setting (preset, bit width, clip ...) is unknown or out of range."""


class DataError(OspError, RuntimeError):
    """Missing, empty or unusable data, or a data cache that cannot be used."""


class CheckpointError(OspError, ValueError):
    """A checkpoint or exported folder is missing, corrupt, or not something osp wrote."""


class RunDirError(OspError, ValueError):
    """A run directory is not one, is in use, or would be overwritten."""


class ExportError(OspError, ValueError):
    """A model or tokenizer cannot be exported in the asked format, or not to the asked place."""


class PathNotFoundError(OspError, FileNotFoundError):
    """A file or folder the user named (a checkpoint, a tokenizer, a run) does not exist."""


class OutputExistsError(OspError, FileExistsError):
    """An output would replace something that is not an earlier output of the same kind (a run's files, a
    folder, another file)."""


class TrainingError(OspError, RuntimeError):
    """Training cannot go on (a non-finite loss, too many skipped steps)."""


# What training says after a fault of the machine: how to continue, and which setting moves its files.
TRAIN_FAULT_HINTS = {"again": "continue with resume=auto: earlier checkpoints are intact",
                     "place": "runs_root=PATH (or OSP_CACHE_DIR for the data cache)"}


def environment_fault(err: BaseException,
                      again: str = "run the command again: what was written before is intact",
                      place: str = "place") -> str | None:
    """One line for a fault of the machine rather than of osp (disk full, read-only or forbidden place), else
    None; `again` says how to go on after freeing space, `place` what to choose instead of an unwritable
    one."""
    if not isinstance(err, OSError):
        return None
    where = err.filename or "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {where}; "
                f"free space (or move runs_root / OSP_CACHE_DIR) and {again}")
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"cannot write {where} ({os.strerror(err.errno)}); choose a writable {place}"
    if err.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{where}: {os.strerror(err.errno).lower()}; give a folder where a folder is expected"
    if err.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT):
        return f"{where}: {os.strerror(err.errno).lower()}; check the path"
    return None


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (Lightning, Hydra and instantiate wrap the one that names the
    fault)."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def one_line(text: str) -> str:
    """A message on one line (Hydra lists the available options on lines of their own)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_line(err: BaseException, **hints: str) -> str | None:
    """What a command prints for `err` (an osp error, or an environment fault, also when wrapped by Hydra or
    Lightning; `hints` as `environment_fault` takes them), or None when it is a bug that deserves its
    traceback."""
    for candidate in (err, root_cause(err)):
        if isinstance(candidate, OspError):
            return one_line(str(candidate))
        fault = environment_fault(candidate, **hints)
        if fault is not None:
            return fault
    return None
