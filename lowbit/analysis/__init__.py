"""Statistical toolkit: variance decomposition, analytic bounds, bin utilization.

* :func:`gradient_variance` — Theorem 2 measured: SGD, quantization and total variance
  per parameter group, the decomposition check, a bias test, and the predicted bound;
* :func:`variance_profile` — which layer's quantizer adds variance to which gradient;
* :func:`jacobian_spectrum` and :mod:`.bounds` — the propagated bound of Theorem 2;
* :func:`bin_utilization` — a gradient's values on each quantizer's integer grid;
* :func:`quantization_variance`, :func:`with_config` — small helpers used elsewhere.
"""

from .bins import BinHistogram, bin_histogram, bin_utilization, plot_bin_utilization
from .bounds import JacobianSpectrum, LayerNoise, jacobian_spectrum, weighted_expected_variance
from .plots import plot_bounds, plot_profile
from .variance import (
    GroupVariance,
    VarianceProfile,
    VarianceReport,
    gradient_variance,
    quantization_variance,
    variance_profile,
    with_config,
)

__all__ = [
    "BinHistogram",
    "GroupVariance",
    "JacobianSpectrum",
    "LayerNoise",
    "VarianceProfile",
    "VarianceReport",
    # bin utilization
    "bin_histogram",
    "bin_utilization",
    # measurement
    "gradient_variance",
    # Theorem 2 bound
    "jacobian_spectrum",
    # figures
    "plot_bin_utilization",
    "plot_bounds",
    "plot_profile",
    "quantization_variance",
    "variance_profile",
    "weighted_expected_variance",
    "with_config",
]
