"""The affine combine, re-exported for the scan package and the sequence-parallel exchange.

Defined in `psm_train.kernels.chunk_affine.combine` (kernels import nothing from psm_train), which
says where it is used: the PyTorch chunked form and the cross-rank exchange apply it; the Triton
kernels compute the same map inline.
"""

from psm_train.kernels.chunk_affine.combine import apply, combine

__all__ = ["apply", "combine"]
