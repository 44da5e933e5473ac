"""Statistical toolkit: variance decomposition, analytic bounds, bin utilization."""

from .variance import quantization_variance, with_config

__all__ = ["quantization_variance", "with_config"]
