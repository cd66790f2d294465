"""`python -m osp <command> [args]`: the same as `osp <command>`, e.g. under torchrun (`-m osp train ...`)."""

from osp.cli import main

main()
