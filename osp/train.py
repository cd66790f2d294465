"""`python -m osp.train [overrides]`: the same entry as `osp train`, convenient under torchrun."""

from osp.training.train import main

if __name__ == "__main__":
    main()
