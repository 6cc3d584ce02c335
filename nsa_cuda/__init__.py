"""nsa_cuda: Native Sparse Attention (Yuan et al. 2025) as compiled CUDA kernels for PyTorch.

The ops live in ``torch.ops.nsa_cuda`` (registered by the compiled extension ``nsa_cuda._C``);
``nsa_cuda.ops`` wraps them with defaults, autograd and fake (meta) implementations.
``nsa_cuda.reference`` is the plain-PyTorch specification the kernels are tested against.
"""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (loads the library: registers the ops)
from . import reference
from .ops import (
    combine,
    compress,
    compressed_attention,
    decode,
    select_blocks,
    selected_attention,
    window_attention,
)
from .cache import NSACache
from .functional import nsa_attention
from .module import NativeSparseAttention

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build compiled: ``cuda`` (bool), ``archs``, ``dtypes``, ``head_dims`` (lists)."""
    raw = _C.build_info()
    return {
        "cuda": bool(raw["cuda"]),
        "archs": [a for a in raw["archs"].split("_") if a and a != "none"],
        "dtypes": raw["dtypes"].split("_"),
        "head_dims": [int(d) for d in raw["head_dims"].split("_")],
    }


__all__ = [
    "NSACache",
    "NativeSparseAttention",
    "build_info",
    "combine",
    "compress",
    "compressed_attention",
    "decode",
    "nsa_attention",
    "reference",
    "select_blocks",
    "selected_attention",
    "window_attention",
]
