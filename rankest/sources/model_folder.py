"""A local teacher checked before it is loaded: config, weights and tokenizer, each failure a sentence.

transformers meets a damaged or inconsistent folder with whatever its code path raises (a
``TypeError`` for a ``config.json`` holding a list, a negative tensor dimension, a
``SafetensorError`` for a truncated file) — and, worst, a folder without tokenizer files loads
with a 2-token placeholder tokenizer and gives a silently wrong spectrum. These checks read only
``config.json``, the weight files' headers and the folder's listing, so they cost milliseconds:

* :func:`check_config` — ``config.json`` is a JSON object whose sizes are positive integers,
  whose attention heads divide the width and whose key/value heads divide the heads;
* :func:`check_weights` — weight files are present; each ``.safetensors`` header is readable and
  its tensors lie inside the file (:func:`safetensors_shapes`); a ``.bin`` is a torch zip or
  pickle; the embedding and head tensors have the config's vocabulary and width;
* :func:`check_tokenizer_files` — the tokenizer is there (the vocabulary's agreement with the
  head is checked on the loaded tokenizer by :class:`rankest.sources.teachers.Teacher`);
* :func:`check_gguf` — a ``.gguf`` file starts with the GGUF magic and a known version.

Reference: the safetensors format (https://github.com/huggingface/safetensors: an 8-byte
little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then
the tensors' bytes, which the header's offsets must cover exactly); the GGUF header
(ggml's ``gguf.md``: magic ``GGUF``, a uint32 version, uint64 tensor and key counts).
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Any

from rankest.errors import UserError

__all__ = ["check_model_folder", "check_config", "check_weights", "check_tokenizer_files", "check_gguf",
           "safetensors_shapes", "TOKENIZER_FILES"]

#: Files of which one makes a folder's tokenizer (fast, SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
#: Integer sizes of a config (under their names in the common architectures) that must be > 0.
SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head", "num_key_value_heads",
             "num_hidden_layers", "n_layer", "vocab_size", "intermediate_size", "max_position_embeddings",
             "n_positions", "head_dim")
#: Sizes that may be absent but not null: every architecture reads them as integers.
REQUIRED_IF_PRESENT = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
#: Suffixes of the input-embedding and LM-head tensors, whose shape is (vocab_size, hidden_size).
VOCAB_TENSORS = ("embed_in.weight", "embed_out.weight", "embed_tokens.weight", "wte.weight", "lm_head.weight",
                 "word_embeddings.weight")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FIX = "save the model again with save_pretrained, or download it again"


def check_model_folder(folder: pathlib.Path) -> dict[str, Any]:
    """Check a local teacher folder before loading it; returns its ``config.json`` as a dict.

    Raises
    ------
    UserError
        One sentence naming the first problem found and its fix.
    """
    config = check_config(folder)
    check_weights(folder, config)
    check_tokenizer_files(folder)
    return config


def _size(config: dict, *keys: str):
    return next((config[k] for k in keys if config.get(k) is not None), None)


def check_config(folder: pathlib.Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict, its sizes positive integers and its heads consistent."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"the teacher's {path} is not readable JSON ({e}); {_FIX}.") from None
    if not isinstance(config, dict):
        raise UserError(f"the teacher's {path} holds a JSON {type(config).__name__}, not an object of settings; "
                        f"{_FIX}.")
    for key in SIZE_KEYS:
        v = config.get(key)
        if (v is not None or (key in config and key in REQUIRED_IF_PRESENT)) and (
                isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"the teacher's {path} has {key} = {v!r}, not a positive integer; correct it or {_FIX}.")
    width, heads = _size(config, "hidden_size", "n_embd", "d_model"), _size(config, "num_attention_heads", "n_head")
    if width and heads and config.get("head_dim") is None and width % heads:
        raise UserError(f"the teacher's {path} has a width of {width} that its {heads} attention heads do not "
                        f"divide; correct hidden_size or num_attention_heads, or {_FIX}.")
    kv = config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise UserError(f"the teacher's {path} has {heads} attention heads that its {kv} key/value heads do not "
                        f"divide; correct num_key_value_heads, or {_FIX}.")
    return config


def safetensors_shapes(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a ``.safetensors`` file, after checking its header against its size.

    Raises UserError for an empty, truncated or foreign file (header length beyond the file,
    unreadable JSON, offsets outside the data or not covering it, a shape whose bytes disagree).
    """
    size = path.stat().st_size
    bad = f"the teacher's weight file {path} ({size:,} bytes)"
    if size < 8:
        raise UserError(f"{bad} is empty or truncated; {_FIX}.")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise UserError(f"{bad} is not a safetensors file or is truncated (its header claims {n:,} bytes); "
                            f"{_FIX}.")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{bad} has an unreadable safetensors header; {_FIX}.")
    data, end, shapes = size - 8 - n, 0, {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(x) for x in t["data_offsets"])
            shape = tuple(int(x) for x in t["shape"])
            item = _DTYPE_BYTES.get(t["dtype"])
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{bad} has a malformed entry for tensor {name!r}; {_FIX}.") from None
        if not 0 <= lo <= hi <= data or min(shape, default=1) < 0 or (
                item is not None and math.prod(shape) * item != hi - lo):
            raise UserError(f"{bad} is truncated or damaged: tensor {name!r} lies outside its data; {_FIX}.")
        shapes[name], end = shape, max(end, hi)
    if end != data:
        raise UserError(f"{bad} is truncated or damaged: its tensors cover {end:,} of {data:,} data bytes; {_FIX}.")
    return shapes


def _check_bin(path: pathlib.Path) -> None:
    """A ``.bin`` checkpoint is a torch zip archive or a pickle (its content is torch.load's, with
    ``weights_only``: a pickle of other objects is refused when it loads)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"the teacher's weight file {path} is neither a torch zip archive nor a pickle "
                        f"(empty, truncated or foreign); {_FIX}.")


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The weight files the folder's index names (the shards), else the folder's weight files."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = folder / index
        if path.is_file():
            try:
                weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"the teacher's {path} is not a readable weight index; {_FIX}.") from None
            missing = [n for n in names if not (folder / str(n)).is_file()]
            if missing:
                raise UserError(f"the teacher's {path} names {len(missing)} missing shard(s), e.g. {missing[0]}; "
                                f"copy every shard into {folder}.")
            return [folder / str(n) for n in names]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def check_weights(folder: pathlib.Path, config: dict) -> None:
    """Weights present and readable, the vocabulary tensors of the config's (vocab_size, width)."""
    files = _weight_files(folder)
    if not files:
        raise UserError(f"the teacher folder {folder} has no weights (model.safetensors or pytorch_model.bin); "
                        f"save the model into it with save_pretrained.")
    vocab, width = config.get("vocab_size"), _size(config, "hidden_size", "n_embd", "d_model")
    for path in files:
        if path.suffix != ".safetensors":
            _check_bin(path)
            continue
        for name, shape in safetensors_shapes(path).items():
            if not name.endswith(VOCAB_TENSORS) or len(shape) != 2:
                continue
            if vocab and shape[0] != vocab:
                raise UserError(f"the teacher's config.json says vocab_size = {vocab} but its weights' {name} has "
                                f"{shape[0]} rows; the config and the weights are of different models — {_FIX}.")
            if width and shape[1] != width:
                raise UserError(f"the teacher's config.json says a width of {width} but its weights' {name} has "
                                f"{shape[1]} columns; the config and the weights are of different models — {_FIX}.")


def check_tokenizer_files(folder: pathlib.Path) -> None:
    """The folder holds a tokenizer: without one, transformers falls back to a placeholder of a
    few tokens and every row would be wrong, so it is refused."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise UserError(f"the teacher folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        f"save the model's own tokenizer into it (tokenizer.save_pretrained(folder)).")


def check_gguf(path: pathlib.Path) -> None:
    """A GGUF file's header: the magic, a known version, and room for the tensor and key counts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise UserError(f"the teacher {path} ({size:,} bytes) is not a GGUF file (empty, truncated or foreign); "
                        f"download it again or pass a model folder.")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (1, 2, 3):
        raise UserError(f"the teacher {path} is GGUF version {version}, which this gguf reader does not know; "
                        f"convert it with a current llama.cpp or pass a model folder.")
