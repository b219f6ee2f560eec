from typing import Any, Optional

import torch

from rankest.accumulate.anisotropy import Anisotropy
from rankest.diagnostics.head_spectrum import teacher_head_spectrum
from rankest.io.sweep_results import write_results
from rankest.report.diagnostics import write_diagnostics_report


# ---- inside `estimate --diagnostics` ---------------------------------------------------------
class EstimateDiagnostics:
    """Anisotropy and head spectrum on the estimate's own batches (no extra forward pass).

    The estimate asks the teacher for every layer's hidden states in the same forward that gives
    its features (:meth:`rankest.sources.teachers.Teacher.hidden_states`), feeds the sampled rows of each
    layer here, and at the end :meth:`finish` writes anisotropy.* and head_spectrum.* into the
    run folder under their own keys (:meth:`write`); :meth:`summary` gives the few keys the
    estimate's results.json carries (``anisotropy``, ``depth``, ``head_singular_entropy_kl``, …).
    """

    def __init__(self, teacher, *, pca: bool = True) -> None:
        self.teacher = teacher
        self.pca = pca
        # The layers' widths (and whether the last is the head's input) from a one-token forward,
        # so that the accumulator exists before the first batch: a checkpoint, a resume and the
        # processes of a torchrun job (all summing the same layout) need it from the start.
        features, layers = teacher.hidden_states(torch.zeros(1, 1, dtype=torch.long))
        self.acc = Anisotropy([h.shape[-1] for h in layers], pca=pca, device=teacher.device)
        self.last_is_head_input = bool(torch.equal(layers[-1], features))
        self._results: Optional[tuple[dict[str, Any], dict[str, Any]]] = None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One forward: returns the (B, L, d) features and accumulates the masked rows of every layer."""
        features, layers = self.teacher.hidden_states(ids)
        self.acc.update([h[mask] for h in layers])
        return features

    def results(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(anisotropy result, head spectrum result), computed once."""
        if self._results is None:
            aniso: dict[str, Any] = self.acc.finalize()
            aniso["last_is_head_input"] = self.last_is_head_input
            aniso["source"] = self.teacher.source
            head = teacher_head_spectrum(self.teacher)
            head["source"] = self.teacher.source
            self._results = (aniso, head)
        return self._results

    def summary(self) -> dict[str, Any]:
        """The keys the estimate adds to its own results (results.json), under their result names (docs/design.md)."""
        aniso, head = self.results()
        return {
            "anisotropy": aniso["anisotropy"].tolist(), "depth": aniso["depth"].tolist(),
            "head_singular_entropy_kl": head["head_singular_entropy_kl"],
            "head_singular_entropy_kl_sq": head["head_singular_entropy_kl_sq"],
            "head_effective_rank": head["head_effective_rank"],
        }

    def write(self, out, *, config: dict, prov: dict) -> None:
        """anisotropy.{h5,json}, head_spectrum.{h5,json}, the PNGs and the report.md sections in
        the run folder ``out`` (after the estimate's own report.md, whose content is kept)."""
        aniso, head = self.results()
        label = self.teacher.revision or self.teacher.name
        write_results(out, "anisotropy", {label: aniso}, config=config, prov=prov)
        write_results(out, "head_spectrum", {label: head}, config=config, prov=prov)
        write_diagnostics_report(out, anisotropy={label: aniso}, head_spectrum={label: head},
                                 teacher=self.teacher.name)
