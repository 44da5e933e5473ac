"""lowbit: fully quantized training (FQT) for PyTorch.

Every GEMM of training — forward and both backward ones — runs with low-bit operands,
and the gradients are unbiased estimates of the quantization-aware (QAT) gradient::

    import lowbit
    model = lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-bhq-4"))
"""

from .attention_modules import (
    FQTMultiheadAttention,
    FQTScaledDotProductAttention,
    ScaledDotProductAttention,
)
from .config import RECIPES, Backend, FQTConfig, GradSpec, OperandSpec, Overflow, RangeMode, describe
from .conversion import ConversionReport, ConversionWarning
from .coverage import CoverageReport, coverage
from .formats import IntFormat, Rounding
from .conv import fqt_conv1d
from .functional import fqt_conv2d, fqt_linear
from .nn import (
    FQTConv1d,
    FQTConv2d,
    FQTLinear,
    convert,
    fqt_blocks,
    fqt_layers,
    frozen_ranges,
    load_range_state,
    load_rng_state,
    range_state,
    range_stats,
    reset_ran,
    rng_state,
)
from .quantizers import QUANTIZERS, Granularity, get_quantizer, quantize_grad
from . import amp as amp  # the submodule lowbit.amp (GradScaler), imported after .nn

__version__ = "0.1.0"

__all__ = [  # grouped by role, not sorted
    # configuration
    "FQTConfig",
    "OperandSpec",
    "GradSpec",
    "Backend",
    "Granularity",
    "Rounding",
    "RangeMode",
    "Overflow",
    "RECIPES",
    # number formats and quantizers
    "IntFormat",
    "QUANTIZERS",
    "get_quantizer",
    "quantize_grad",
    # layers and conversion
    "FQTLinear",
    "FQTConv1d",
    "FQTConv2d",
    "convert",
    "ConversionReport",
    "ConversionWarning",
    "describe",
    "fqt_layers",
    "fqt_blocks",
    "reset_ran",
    "fqt_linear",
    "fqt_conv1d",
    "fqt_conv2d",
    # attention
    "FQTMultiheadAttention",
    "ScaledDotProductAttention",
    "FQTScaledDotProductAttention",
    # what ran low-bit
    "coverage",
    "CoverageReport",
    # predicted gradient ranges
    "range_stats",
    "frozen_ranges",
    # reproducibility and checkpoints
    "rng_state",
    "load_rng_state",
    "range_state",
    "load_range_state",
]

# Submodules the README names as ``lowbit.optim.SRSGD``, ``lowbit.analysis.gradient_variance``
# and so on, imported on first use (PEP 562) so that ``import lowbit`` stays light: a plain
# ``import lowbit`` then reaches them as attributes, as ``import torch`` reaches ``torch.optim``.
_LAZY_SUBMODULES = frozenset({"adaptive", "analysis", "distributed", "experiments", "monitor", "optim",
                              "plots", "ranges", "hf"})


def __getattr__(name: str) -> object:
    if name in _LAZY_SUBMODULES:
        import importlib

        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:  # lowbit.hf without transformers: hasattr says False
            raise AttributeError(f"lowbit.{name} needs {exc.name!r}, which is not installed") from exc
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
