"""nn.Module layers of Batch Normalization and its successors: parameters, buffers, train/eval,
input checks; one file per family, re-exported here.

- :mod:`~bnlab.modules.batch`: :class:`BatchNorm` (1d/2d/3d), :class:`BatchNormAct`, the base of the rest;
- :mod:`~bnlab.modules.renorm`: :class:`BatchRenorm`;
- :mod:`~bnlab.modules.ghost`: :class:`GhostBatchNorm`;
- :mod:`~bnlab.modules.cross_iter`: :class:`CrossIterationBatchNorm` and :func:`cross_iteration`;
- :mod:`~bnlab.modules.model`: functions over a whole model (:func:`evaluating`, :func:`recalibrate`,
  :func:`convert`, :func:`to_torch`, :func:`fuse`).
"""

from bnlab.modules.batch import (
    STATS,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    is_batch_norm,
    name_layers,
)
from bnlab.modules.cross_iter import (
    WINDOW_BUFFERS,
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    cross_iteration,
)
from bnlab.modules.ghost import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.modules.model import convert, evaluating, fuse, recalibrate, to_torch
from bnlab.modules.renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d


__all__ = [
    "STATS",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "is_batch_norm",
    "name_layers",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "WINDOW_BUFFERS",
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "cross_iteration",
    "convert",
    "fuse",
    "evaluating",
    "recalibrate",
    "to_torch",
]
