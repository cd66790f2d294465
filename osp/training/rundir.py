"""A run directory belongs to one run: never silently reused, used by one process at a time, and cleaned
of what a killed checkpoint write left behind.

- `check_fresh` refuses to start a new run (resume=null) in a folder that holds another run's checkpoints,
  metrics or summary: those would be overwritten or mixed. `resume=auto` continues that run instead.
- `RunLock` is an exclusive lock on `<run_dir>/.lock` held by rank 0 for the whole run, so a second
  `osp train` with the same run name fails at once instead of crashing both runs.
- `recover_checkpoints` removes staging files (`*.tmp`) of a checkpoint write that was killed midway and
  puts back a checkpoint that was moved aside (`*.old`) but not yet replaced.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from osp.atomic import remove_path
from osp.data.cache import human_bytes
from osp.errors import RunDirError

try:
    import fcntl
except ImportError:  # Windows: no flock; two runs with one name are then not detected
    fcntl = None  # type: ignore[assignment]

# What a run writes that a new run in the same folder would overwrite or mix with its own.
ARTEFACTS = ("checkpoints", "summary.json", "csv", "export", "tokenizer")
LOCK = ".lock"


def artefacts(run_dir: Path) -> list[str]:
    """The run artefacts present in `run_dir` (empty folders do not count)."""
    found = []
    for name in ARTEFACTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def is_run_dir(path: Path) -> bool:
    """A folder that holds (or held) a run: its artefacts, its Hydra record or its lock."""
    return path.is_dir() and (bool(artefacts(path)) or (path / ".hydra").is_dir() or (path / LOCK).is_file())


def check_placement(run_name: str, runs_root: Path, run_dir: Path) -> None:
    """Refuse a run_name that is no name (empty, absolute, `.`/`..` parts: it would escape runs_root) and a
    run dir that lies inside another run (`other/checkpoints`): either would write into someone else's
    files."""
    parts = Path(run_name).parts
    if not run_name.strip() or Path(run_name).is_absolute() or any(p in (".", "..") for p in parts):
        raise RunDirError(f"run_name={run_name!r} is not a name for a folder under runs_root (no empty name, "
                          "absolute path, '.' or '..'); choose a plain name like run_name=my-run")
    root = Path(os.path.abspath(runs_root))
    for parent in Path(os.path.abspath(run_dir)).parents:
        if parent == root or root not in parent.parents:  # only the folders between runs_root and the run
            break
        if is_run_dir(parent):
            raise RunDirError(f"run dir {run_dir} lies inside the run {parent}; choose a run_name "
                              "(or run_dir) outside every other run")


def check_fresh(run_dir: Path, run_name: str, resume: str | None) -> None:
    """Refuse to start at step 0 in a folder that already holds a run.

    With resume=auto and no checkpoint yet, a run that never reached its first checkpoint is started over
    (that is what a relaunch after an early crash wants); one that has a summary is refused all the same.
    """
    found = artefacts(run_dir)
    if resume == "auto" and "summary.json" not in found:
        return
    if resume == "auto":
        raise RunDirError(f"run dir {run_dir} holds a run with a summary but no checkpoint to continue from; "
                          "start a new run under another run_name (or delete the folder yourself)")
    if found:
        raise RunDirError(f"run dir {run_dir} already holds a run ({', '.join(found)}); continue it with "
                          f"`osp train run_name={run_name} resume=auto`, or start a new one under another "
                          "run_name")


class RunLock:
    """Exclusive, non-blocking lock on `<run_dir>/.lock`; the holder's pid and host are written into it.

    The kernel drops a flock when its process dies (kill -9 included), so a stale lock never blocks a rerun.
    (Not filelock, which the data cache uses: it truncates the lock file whenever a process tries it, and the
    refusal names the holder from that file.)
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise RunDirError(f"run dir {self.path.parent} is in use by {holder}; wait for it to finish, "
                                  "or start this run under another run_name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock; the file stays (removing it would race)
            self._handle = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def recover_checkpoints(folder: Path) -> list[str]:
    """Undo what a checkpoint write killed midway left in `folder`; returns one line per action.

    `X.tmp` is a staging file or folder that never became `X`: removed. `X.old` is the previous checkpoint,
    moved aside just before its replacement was moved in: put back as `X` if that move never happened,
    removed otherwise.
    """
    actions: list[str] = []
    if not folder.is_dir():
        return actions
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".tmp"):
            size = _size(path)
            remove_path(path)
            actions.append(f"removed {path.name} ({human_bytes(size)}), left by a checkpoint write that was "
                           "interrupted")
        elif path.name.endswith(".old"):
            final = path.with_name(path.name[: -len(".old")])
            if final.exists():
                remove_path(path)
            else:
                os.replace(path, final)
                actions.append(f"restored {final.name} from {path.name} (its replacement was never written)")
    return actions


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
