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
from osp.errors import TRAIN_FAULT_HINTS, OspError, environment_fault, error_line, one_line, root_cause
from osp.training.preemption import Preempted
from osp.training.run import RunFinished, check_resume_config, preflight, starting_point, train
from osp.training.rundir import RunLock


def moved_key_hint(message: str) -> str:
    """For `data.<key>=...` refused as not in the config where <key> is a source's setting: where it lives
    now."""
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
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    lock = None
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN and launch_rank() == 0:
            lock = checked_and_locked(cfg)  # a sweep's job: the checks start_checks makes for a single run
        train(cfg)
    except RunFinished as done:
        if launch_rank() == 0:
            print(f"osp train: {done}", file=sys.stderr)
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
        message = error_line(err, **TRAIN_FAULT_HINTS) or peer_lost(err, str(cfg.run_name))
        if message is None:
            raise
        print(f"osp train: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if lock is not None:
            lock.release()


# What gloo and NCCL say when the process at the other end of a collective is gone.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
             "NCCL communicator was aborted", "failed to recv", "Connection refused")


def peer_lost(err: BaseException, run_name: str) -> str | None:
    """One line for this rank when another rank of a distributed run died (killed, out of memory): which rank
    this is and how the run continues; None for any other error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = f"{err} {root_cause(err)}"
    if not any(marker in text for marker in LOST_PEER):
        return None
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} lost contact with another rank, which died "
            f"(killed, out of memory?); the run keeps its checkpoints: relaunch it with run_name={run_name} "
            "resume=auto")


def checked_and_locked(cfg: DictConfig) -> RunLock:
    """The run's settings and run dir checked (`preflight`, `starting_point`, the resume record), and its lock
    taken: what no process may skip before it writes into a run dir."""
    preflight(cfg)
    ckpt_path = starting_point(cfg)
    if ckpt_path is not None:
        check_resume_config(cfg, ckpt_path)
    lock = RunLock(Path(cfg.run_dir))
    lock.acquire()
    return lock


# Hydra's flags that only print (the config, help, info) and write nothing; the multirun flag; flags whose
# value follows them. Every other flag is refused by check_hydra_flags.
READ_ONLY_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--package",
                   "-p", "--shell-completion", "-sc")
MULTIRUN_FLAGS = ("--multirun", "-m")
# Overrides of Hydra's own output placement, which osp ties to the run dir (its record beside its
# checkpoints).
HYDRA_PLACEMENT = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.output_subdir",
                   "hydra.job.chdir")


def check_hydra_flags(args: list[str]) -> None:
    """Refuse the Hydra flags and overrides that would bypass the run-dir checks and lock or put the run's
    record elsewhere than its checkpoints: another primary config (-cn/-cp/-cd), another output dir."""
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if arg.startswith("-") and arg.split("=", 1)[0] not in READ_ONLY_FLAGS + MULTIRUN_FLAGS:
            raise SystemExit(f"osp train: error: {arg.split('=', 1)[0]} is not an option of osp train: "
                             "its config is configs/train.yaml, changed by recipe=NAME and key=value "
                             "overrides (--cfg job prints it, -m sweeps)")
        if key in HYDRA_PLACEMENT:
            raise SystemExit(f"osp train: error: {key} is where osp keeps the run's record beside its "
                             "checkpoints; set run_name=, runs_root= or run_dir= instead")


def start_checks(args: list[str]) -> RunLock | None:
    """Before Hydra creates anything: compose, check the settings and the run dir, lock it (rank 0).

    A config that fails here leaves no run folder behind, and a second run with the name of a live one
    stops before it writes a byte there (Hydra would overwrite the first run's .hydra/ at start).
    Hydra's read-only flags (--cfg, --help, --info, ...) write nothing and skip the checks; a multirun sweep
    (-m) composes per job, so each job is checked and locked inside it (`_hydra_main`); flags that would
    replace osp's config or move the run's record away from it are refused.
    """
    if launch_rank() > 0:  # a worker started by a launcher (Lightning adds its own hydra.run.dir for them)
        return None
    check_hydra_flags(args)
    if any(a in READ_ONLY_FLAGS or a in MULTIRUN_FLAGS for a in args):
        return None
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        lock = checked_and_locked(compose(args))
    except RunFinished as done:  # a relaunch of a finished run: say so, change nothing, succeed
        print(f"osp train: {done}", file=sys.stderr)
        raise SystemExit(0) from None
    except (OspError, FileNotFoundError) as err:
        raise SystemExit(f"osp train: error: {one_line(str(err))}") from None
    except (HydraException, OmegaConfBaseException, ValueError, TypeError, KeyError) as err:
        # Hydra's override grammar and defaults list raise plain ValueErrors too (`recipe=-1`).
        raise SystemExit(f"osp train: error: {composition_error(err)}{moved_key_hint(str(err))}") from None
    except OSError as err:
        raise SystemExit("osp train: error: "
                         f"{environment_fault(err, **TRAIN_FAULT_HINTS) or one_line(str(err))}") from None
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
