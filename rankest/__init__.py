"""rankest: how high is the rank of a language model's target distribution?

Stream a teacher's log-probabilities over a corpus into accumulators (never the N×V' matrix),
estimate the singular spectrum exactly (factor / Gram routes) or by randomized sketching, and
report W-error curves, the rank needed for a given error, and what a rank-r head costs.

    python -m rankest estimate                      # embedded teacher + corpus, offline
    python -m rankest estimate --teacher pythia-6.9b --corpus wikitext-103 --tokens 100000

Reference: Godey, de la Clergerie & Sagot (2024), "Why do small language models
underperform? Studying LM saturation via the softmax bottleneck", arXiv 2404.07647.
"""

from rankest._version import __version__  # noqa: E402
from rankest.diagnostics.commands import run_anisotropy, run_head_spectrum
from rankest.diagnostics.config import AnisotropyConfig, HeadSpectrumConfig
from rankest.errors import UserError  # noqa: E402
from rankest.estimator.config import EstimateConfig
from rankest.estimator.pipeline import run_estimate
from rankest.heads.config import HeadsConfig
from rankest.heads.pipeline import run_heads
from rankest.options import keyword_options
from rankest.spectrum import Spectrum  # noqa: E402

# The keyword-only signatures and the option lists of the docstrings below are made from the
# config dataclasses (rankest.options.keyword_options); an unknown keyword is a TypeError.


@keyword_options(EstimateConfig)
def estimate(*, return_summary: bool = False, **kwargs):
    """Estimate a teacher's target spectrum; see :func:`rankest.estimator.pipeline.run_estimate`.

    Returns the :class:`Spectrum`, or ``(spectrum, results.json summary)`` with ``return_summary``."""
    return run_estimate(return_summary=return_summary, **kwargs)


@keyword_options(AnisotropyConfig)
def anisotropy(**kwargs):
    """Per-layer anisotropy of a teacher or of each of its checkpoints; see
    :func:`rankest.diagnostics.commands.run_anisotropy`."""
    return run_anisotropy(**kwargs)


@keyword_options(HeadSpectrumConfig)
def head_spectrum(**kwargs):
    """Singular spectrum and singular entropy of a teacher's output head, per checkpoint; see
    :func:`rankest.diagnostics.commands.run_head_spectrum`."""
    return run_head_spectrum(**kwargs)


@keyword_options(HeadsConfig)
def fit_heads(**kwargs):
    """Fit rank-constrained heads on a frozen teacher; see :func:`rankest.heads.pipeline.run_heads`."""
    return run_heads(**kwargs)


__all__ = ["Spectrum", "UserError", "estimate", "fit_heads", "anisotropy", "head_spectrum", "__version__"]
