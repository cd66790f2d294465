"""Outlier metrics: OSP per-token kurtosis, per-channel kurtosis, max|h|, max/median."""

from osp.metrics.activations import (
    FEEDS,
    Feed,
    evaluate_kurtosis,
    format_kurtosis,
    model_kurtosis,
    outlier_log_dict,
    outlier_stats,
)
from osp.metrics.outliers import (
    excess_kurtosis,
    gaussian_floor,
    max_abs,
    max_median_ratio,
    per_channel_kurtosis,
    token_excess_kurtosis,
    token_max_median_ratio,
)

__all__ = [
    "FEEDS",
    "Feed",
    "evaluate_kurtosis",
    "excess_kurtosis",
    "format_kurtosis",
    "gaussian_floor",
    "max_abs",
    "max_median_ratio",
    "model_kurtosis",
    "outlier_log_dict",
    "outlier_stats",
    "per_channel_kurtosis",
    "token_excess_kurtosis",
    "token_max_median_ratio",
]
