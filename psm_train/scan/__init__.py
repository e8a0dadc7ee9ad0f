"""Prefix scans: the fixed Blelloch tree (parallel and online) and the affine combine."""

from psm_train.scan.affine import apply, combine
from psm_train.scan.tree import Aggregator, OnlineScan, prefix_scan

__all__ = ["Aggregator", "OnlineScan", "apply", "combine", "prefix_scan"]
