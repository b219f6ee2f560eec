"""Saturation (Godey et al. 2024, §3–5): small models fall below the scaling law, and late in
training get worse.

``python -m rankest saturation`` reads a metric across checkpoints and model sizes — from
lm-evaluation-harness result files (:mod:`~rankest.saturation.evals`) and / or rankest's own
streamed evaluation of checkpoints (:mod:`~rankest.saturation.stream`) — finds each model's best
checkpoint and saturation onset (:mod:`~rankest.saturation.onset`), fits L(N) = E + A·N^(−α) on
the models that do not saturate (:mod:`~rankest.saturation.lawfit`, parameter counts from
:mod:`~rankest.saturation.params`), and reports every model's relative distance from it
(:mod:`~rankest.saturation.analysis`), with the head's spectrum and the last layer's anisotropy
across the same steps when measured.

    python -m rankest saturation --evals pythia-evals/ --metric lambada_openai:ppl --out runs/sat
    python -m rankest saturation --teachers pythia-70m,pythia-160m --revisions step1000,step143000 \\
        --corpus wikitext-103 --tokens 100000 --diagnostics --out runs/sat-own
"""

from rankest.saturation.pipeline import run_saturation

__all__ = ["run_saturation"]
