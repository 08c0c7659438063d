"""bnlab: Batch Normalization, paper-exact and fast, with the papers' experiments.

The public API; everything here is re-exported from the module that owns it.
"""

from bnlab.modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    convert,
    cross_iteration,
    evaluating,
    fuse,
    is_batch_norm,
    name_layers,
    recalibrate,
    to_torch,
)

from bnlab.distributed import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "SyncBatchNorm",
    "convert",
    "cross_iteration",
    "evaluating",
    "fuse",
    "is_batch_norm",
    "name_layers",
    "recalibrate",
    "to_torch",
]
