"""Parameter counts of a model from its configuration: total and non-embedding.

A GPT-NeoX block (Pythia) with hidden size d, MLP width I and biases everywhere holds

    2·2d (two LayerNorms) + (3d² + 3d) (fused QKV) + (d² + d) (attention output)
    + (d·I + I) + (I·d + d) (MLP)

parameters; the model adds the input embedding V·d, the final LayerNorm 2d and the output
embedding V·d (none when it is tied to the input one). Rotary embeddings have no parameters.
*Non-embedding* parameters (Kaplan et al. 2020) leave out both embedding matrices; *total*
counts everything. Pythia-70M: 70,426,624 total and 18,915,328 non-embedding, the numbers of
its model card; :func:`neox_param_counts` is tested against ``numel`` of random models.

The Pythia suite's configurations (Biderman et al. 2023, Table 1) are known here, so evaluation
files of Pythia models need no download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from rankest.errors import UserError
from rankest.sources.teachers import TEACHERS

__all__ = ["neox_param_counts", "PYTHIA_LAYERS", "pythia_config", "param_counts", "config_counts"]

#: Blocks of each Pythia size (hidden sizes and padded vocabularies are in the teacher table).
PYTHIA_LAYERS = {"14m": 6, "31m": 6, "70m": 6, "160m": 12, "410m": 24, "1b": 16, "1.4b": 24, "2.8b": 32,
                 "6.9b": 32, "12b": 36}


def neox_param_counts(config: Mapping[str, Any]) -> dict[str, int]:
    """Total and non-embedding parameters of a GPT-NeoX model.

    Parameters
    ----------
    config : mapping
        ``hidden_size`` (d), ``num_hidden_layers`` (L), ``vocab_size`` (V), and optionally
        ``intermediate_size`` (I, default 4d), ``tie_word_embeddings`` (default False) and
        ``attention_bias`` (default True), as in a GPT-NeoX ``config.json``.

    Returns
    -------
    {"total": int, "non_embedding": int}
    """
    try:
        d, n_layers, vocab = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])
    except KeyError as e:
        raise UserError(f"the model config has no {e.args[0]!r}; give the parameter count with --params") from None
    inner = int(config.get("intermediate_size") or 4 * d)
    bias = 1 if config.get("attention_bias", True) else 0
    block = 4 * d + 3 * d * d + 3 * d * bias + d * d + d * bias + 2 * d * inner + inner + d
    non_embedding = n_layers * block + 2 * d
    embeddings = vocab * d * (1 if config.get("tie_word_embeddings", False) else 2)
    return {"total": non_embedding + embeddings, "non_embedding": non_embedding}


def pythia_config(name: str) -> Optional[dict[str, Any]]:
    """The GPT-NeoX config fields of a Pythia model (``pythia-160m``, ``pythia-1b-deduped``), or None."""
    info = TEACHERS.get(name)
    if info is None or info.family != "pythia":
        return None
    size = name[len("pythia-"):].removesuffix("-deduped")
    return {"hidden_size": info.hidden_size, "num_hidden_layers": PYTHIA_LAYERS[size],
            "vocab_size": info.logit_width, "intermediate_size": 4 * info.hidden_size,
            "tie_word_embeddings": False}


def config_counts(path) -> dict[str, int]:
    """:func:`neox_param_counts` of a GPT-NeoX ``config.json`` file (``--params NAME=config.json``)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the model config {path} ({e}); give --params NAME=COUNT instead") from None
    if cfg.get("model_type") != "gpt_neox":
        raise UserError(f"{path} is a {cfg.get('model_type')!r} config; rankest counts GPT-NeoX configs only, give "
                        "--params NAME=COUNT for other architectures")
    return neox_param_counts(cfg)


def param_counts(model: str, *, config: Optional[Mapping[str, Any]] = None,
                 given: Optional[Mapping[str, Any]] = None) -> dict[str, int]:
    """Parameter counts of ``model``: ``given`` (``--params NAME=COUNT``: both counts set to it, or
    NAME=config.json: counted from that file) first, then its own ``config`` (a GPT-NeoX
    config.json's fields), then the Pythia table."""
    if given and model in given:
        value = given[model]
        if isinstance(value, Mapping):
            return {"total": int(value["total"]), "non_embedding": int(value["non_embedding"])}
        n = int(value)
        return {"total": n, "non_embedding": n}
    cfg = config if config is not None else pythia_config(model)
    if cfg is None:
        raise UserError(f"the parameter count of {model!r} is not known (not a Pythia model and no config); give it "
                        f"with --params {model}=COUNT")
    return neox_param_counts(cfg)
