"""`osp plan [overrides] [--gpu ...]`: memory per device, FLOPs and time of a train config (osp.plan)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from osp.arguments import positive_int
from osp.errors import ConfigError
from osp.hardware import GPUS
from osp.plan import format_plan, make_plan


def main(argv: list[str] | None = None) -> None:
    from osp.conf import compose

    parser = argparse.ArgumentParser(
        prog="osp plan",
        description="Parameters, memory per device, FLOPs and time of a train config on GPUs "
        "(model built on the meta device; nothing is allocated).")
    parser.add_argument("overrides", nargs="*", help="train config overrides, as for osp train")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--gpus-per-node", type=positive_int, default=8)
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilization assumed (default 0.4)")
    parser.add_argument("--vocab-size", type=positive_int,
                        help="the model's vocabulary, if the tokenizer is not at hand")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = compose(args.overrides)
        p = make_plan(cfg, args.gpu, args.gpus_per_node, args.mfu, args.vocab_size)
    except (ConfigError, ValueError, KeyError) as err:
        print(f"osp plan: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # noqa: BLE001 - Hydra/OmegaConf errors: one line
        print(f"osp plan: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({**asdict(p), "fits": p.fits}, indent=2) if args.json else format_plan(p, cfg))
