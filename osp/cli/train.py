"""`osp train [overrides]`: compose and check the config before Hydra writes anything, lock the run dir,
run `osp.training.run.train` under Hydra, and turn input errors and environment faults into one line.

`python -m osp train`, `python -m osp.cli.train` (torchrun) and the processes Lightning starts for
`trainer.devices > 1` all land in `main`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from osp.conf import CONFIG_DIR, TRAIN_CONFIG, compose, composition_error
from osp.conf.resolvers import launch_rank, register_resolvers, run_id
from osp.errors import TRAIN_FAULT_HINTS, OspError, environment_fault, error_line, one_line
from osp.training import rundir
from osp.training.checkpoints import resolve_resume
from osp.training.preemption import Preempted
from osp.training.run import check_resume_config, preflight, train
from osp.training.rundir import RunLock


def moved_key_hint(message: str) -> str:
    """For `data.<key>=...` refused as not in the config where <key> is a source's setting: where it lives now."""
    import re

    from osp.data import SOURCES

    match = re.search(r"override '\+*data\.(\w+)'", message)
    if match is None:
        return ""
    key = match.group(1)
    kinds = [kind for kind, cls in SOURCES.items() if key in cls.settings()]
    if not kinds:
        return ""
    return f" ({key} is a setting of the {'/'.join(kinds)} source: data.source.{key}=...)"


_LAUNCH_ARGV: list[str] = []  # the command line as started (`osp train ...`), set by main


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=TRAIN_CONFIG)
def _hydra_main(cfg: DictConfig) -> None:
    if _LAUNCH_ARGV:
        sys.argv = list(_LAUNCH_ARGV)  # what Lightning re-runs for the other devices' processes
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        train(cfg)
    except Preempted as stop:
        # Neither success (a scheduler must not mark the job done) nor a crash: one line, no traceback.
        if launch_rank() == 0:
            print(f"osp train: {stop.describe(str(cfg.run_name))}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except MisconfigurationException as err:  # a trainer setting Lightning refuses
        print(f"osp train: error: {one_line(str(err))} (check the trainer.* settings)", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        # Problems with the user's input or the machine get one clear line, not a traceback.
        message = error_line(err, **TRAIN_FAULT_HINTS)
        if message is None:
            raise
        print(f"osp train: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def start_checks(args: list[str]) -> RunLock | None:
    """Before Hydra creates anything: compose, check the settings and the run dir, lock it (rank 0).

    A config that fails here leaves no run folder behind, and a second run with the name of a live one
    stops before it writes a byte there (Hydra would overwrite the first run's .hydra/ at start).
    Multirun sweeps (-m) compose per job, so they are checked inside each job instead.
    """
    if launch_rank() > 0 or any(a in ("-m", "--multirun") or a.startswith("-") for a in args):
        return None
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(args)
        preflight(cfg)
        run_dir = Path(cfg.run_dir)
        ckpt_path = resolve_resume(cfg.resume, run_dir)
        if ckpt_path is None:
            rundir.check_fresh(run_dir, str(cfg.run_name), cfg.resume)
        else:
            check_resume_config(cfg, ckpt_path)
        lock = RunLock(run_dir)
        lock.acquire()
    except (HydraException, OmegaConfBaseException) as err:
        raise SystemExit(f"osp train: error: {composition_error(err)}{moved_key_hint(str(err))}") from None
    except (OspError, FileNotFoundError) as err:
        raise SystemExit(f"osp train: error: {one_line(str(err))}") from None
    except OSError as err:
        raise SystemExit(f"osp train: error: {environment_fault(err, **TRAIN_FAULT_HINTS) or err}") from None
    return lock


def main(argv: list[str] | None = None) -> None:
    """Run training with Hydra overrides (argv defaults to sys.argv[1:])."""
    register_resolvers()
    # Pinned for this process and inherited by the ones Lightning starts for the other devices.
    os.environ["OSP_RUN_ID"] = run_id()
    args = list(sys.argv[1:] if argv is None else argv)
    lock = start_checks(args)
    if launch_rank() > 0:
        # Only rank 0 writes .hydra/ and the job log; the other ranks log to their console.
        args += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    # Hydra reads its overrides from sys.argv; _hydra_main puts the real command line back for Lightning,
    # which starts the processes of other devices (trainer.devices > 1 without torchrun) by re-running it.
    _LAUNCH_ARGV[:] = sys.argv
    sys.argv = [sys.argv[0], *args]
    try:
        _hydra_main()
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":  # python -m osp.cli.train (Lightning re-runs it so, see main)
    main()
