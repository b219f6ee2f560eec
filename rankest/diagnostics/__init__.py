"""Representation diagnostics: per-layer anisotropy and the spectrum of the output head, over
a teacher's checkpoints (:mod:`~rankest.diagnostics.commands`) or inside ``estimate
--diagnostics`` on the same batches (:mod:`~rankest.diagnostics.in_estimate`)."""

from rankest.accumulate.anisotropy import Anisotropy
from rankest.diagnostics.anisotropy import teacher_anisotropy
from rankest.diagnostics.commands import run_anisotropy, run_head_spectrum, sweep_checkpoints
from rankest.diagnostics.head_spectrum import (TOP_RATIOS, head_spectrum_metrics, singular_entropy_kl,
                                               teacher_head_spectrum)
from rankest.diagnostics.in_estimate import EstimateDiagnostics

__all__ = ["Anisotropy", "TOP_RATIOS", "EstimateDiagnostics", "head_spectrum_metrics", "run_anisotropy",
           "run_head_spectrum", "singular_entropy_kl", "sweep_checkpoints", "teacher_anisotropy",
           "teacher_head_spectrum"]
