"""Embedding distributions: how a model's parameter vector `[mean | extra]` is read.

`DISTRIBUTIONS` holds `dirac` (today's point embeddings), `gaussian` and
`vmf`, each a frozen dataclass of its options with the same methods (mean,
modes, confidence, sample, log_prob, log_mls, prior_kl, pdf_product); the
layouts and parametrizations are those of the probabilistic-embeddings
reference code (Karpukhin et al., "Probabilistic Embeddings Revisited",
2022). `log_vmf_normalizer` is the vMF log normalizer with exact gradients.

Importing this package does not import TensorFlow (the config validates a
distribution's options before TensorFlow starts); the scorers, which are
Keras layers, live in `sparse_embed.distributions.scorers`.
"""

from sparse_embed.distributions.base import DISTRIBUTIONS, Distribution, build_distribution
from sparse_embed.distributions.dirac import Dirac
from sparse_embed.distributions.gaussian import Gaussian
from sparse_embed.distributions.parametrization import Parametrization
from sparse_embed.distributions.vmf import VonMisesFisher
from sparse_embed.distributions.vmf_normalizer import (
    approximate_log_vmf_normalizer,
    log_bessel_iv,
    log_unit_sphere_area,
    log_vmf_normalizer,
    vmf_mean_resultant_length,
)

__all__ = [
    "DISTRIBUTIONS",
    "Dirac",
    "Distribution",
    "Gaussian",
    "Parametrization",
    "VonMisesFisher",
    "approximate_log_vmf_normalizer",
    "build_distribution",
    "log_bessel_iv",
    "log_unit_sphere_area",
    "log_vmf_normalizer",
    "vmf_mean_resultant_length",
]
