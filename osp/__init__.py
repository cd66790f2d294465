"""osp: outlier-safe pre-training."""

__version__ = "0.1.0"
