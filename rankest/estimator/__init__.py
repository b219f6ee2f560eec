"""``estimate``: the pipeline every target flows through (:mod:`rankest.estimator.pipeline`),
its options (:mod:`~rankest.estimator.config`), the route policy (:mod:`~rankest.estimator.routes`)
and the multi-pass sketch over a row cache (:mod:`~rankest.estimator.multipass`)."""

from rankest.estimator.config import ROUTES, EstimateConfig
from rankest.estimator.pipeline import Estimate, make_target, ngram_spectrum, run_estimate
from rankest.estimator.routes import choose_route, resolve_passes, sketch_rank

__all__ = ["EstimateConfig", "ROUTES", "Estimate", "make_target", "run_estimate", "ngram_spectrum", "choose_route",
           "resolve_passes", "sketch_rank"]
