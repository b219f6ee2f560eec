"""Options declared once, on the fields of a config dataclass: the CLI and the Python API follow.

A config dataclass (:class:`~rankest.estimator.config.EstimateConfig`,
:class:`~rankest.heads.config.HeadsConfig`, the diagnostics' configs) lists every option of a
command as a field made by :func:`option`, which keeps the flag, help, parser, choices, metavar
and help group in the field's metadata::

    @dataclass
    class Config:
        tokens: Optional[int] = shared_option("tokens")          # one of MODEL_OPTIONS
        space: str = option("clr", choices=SPACES, group="estimation", help="target space ...")
        rows: Any = option(None, cli=False, help="rows made in memory")   # Python only

* :func:`add_arguments` adds a config's options to an argparse parser: ``--name-with-dashes``
  (or ``flag``), ``default`` the field's; a bool field is a switch, ``store_true`` when its
  default is False and ``store_false`` under ``--no-name`` when it is True.
* :func:`config_from_args` turns the parsed namespace back into the config.
* :func:`keyword_options` gives a function taking ``**kwargs`` the keyword-only signature and
  the docstring of a config's fields, so ``inspect.signature`` and an IDE show every option.

The options every command that runs a model shares (teacher, corpus, execution, output) are
declared once in :data:`MODEL_OPTIONS` and put on a config with :func:`shared_option`; they come
first in ``--help``, in that order. The argparse ``type`` functions of the options are here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from rankest.errors import UserError
from rankest.runtime.memory import parse_size
from rankest.sources.teachers import DEVICE_MAPS

__all__ = ["Option", "option", "shared_option", "MODEL_OPTIONS", "option_fields", "add_arguments",
           "config_from_args", "to_kwargs", "keyword_options", "checkpoint_every_option", "resume_option",
           "int_at_least", "positive_int", "nonneg_int", "parse_count", "parse_seed", "parse_tokens",
           "parse_max_memory", "check_numbers", "MAX_COUNT", "MAX_SEED", "parse_passes", "parse_positions"]

#: The key of a field's metadata holding its :class:`Option`.
METADATA_KEY = "rankest.option"


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line and in the API's docstring."""

    help: Optional[str] = None
    flag: Optional[str] = None  # default: --name-with-dashes (--no-name for a bool field defaulting to True)
    type: Optional[Callable[[str], Any]] = None  # argparse type: the parser of the flag's text
    choices: Optional[tuple] = None
    metavar: Optional[str] = None
    group: Optional[str] = None  # title of the --help section (None: the parser's own options)
    cli: bool = True  # False: a Python-only option (rows in memory, a loaded object), no flag
    action: Optional[str] = None  # default: a switch for a bool field, a value otherwise
    nargs: Any = None
    shared: Optional[int] = None  # position in MODEL_OPTIONS (set by shared_option; orders --help)


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           help: Optional[str] = None, flag: Optional[str] = None, type: Optional[Callable[[str], Any]] = None,
           choices: Optional[Iterable] = None, metavar: Optional[str] = None, group: Optional[str] = None,
           cli: bool = True, action: Optional[str] = None, nargs: Any = None) -> Any:
    """A dataclass field declaring an option (see the module docstring); ``default`` is both the
    Python API's and the flag's default."""
    spec = Option(help=help, flag=flag, type=type, choices=None if choices is None else tuple(choices),
                  metavar=metavar, group=group, cli=cli, action=action, nargs=nargs)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={METADATA_KEY: spec})


# ---- argparse type functions (their ArgumentTypeError is one sentence: the CLI prints it, exit 2) ---
#: The largest count an option takes (rows, steps, sizes): 2^53, beyond what any machine holds and
#: the largest integer a float64 carries exactly.
MAX_COUNT = 2**53
#: The largest --seed: leaves room for the offsets added to it (seed + 1, per-rank seeds) within
#: the 64-bit seeds of torch and NumPy.
MAX_SEED = 2**62


def parse_count(text: str, *, low: int, high: int, what: str) -> int:
    """``text`` as an integer in [low, high]: digits, or a finite whole number written as a float
    (``1e5``); anything else is an :class:`argparse.ArgumentTypeError` (argparse names the flag)."""
    t = str(text).strip().replace("_", "")
    try:
        v = int(t)
    except ValueError:
        try:
            f = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}.") from None
        if not math.isfinite(f) or f != int(f):
            raise argparse.ArgumentTypeError(f"expected a finite whole {what} integer, got {text!r}.") from None
        v = int(f)
    if v < low or v > high:
        raise argparse.ArgumentTypeError(f"expected a {what} integer from {low} to {high:,}, got {text!r}.")
    return v


def int_at_least(low: int, what: str, *, high: int = MAX_COUNT) -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (see :func:`parse_count`)."""

    def parse(text: str) -> int:
        return parse_count(text, low=low, high=high, what=what)

    return parse


positive_int = int_at_least(1, "positive")
nonneg_int = int_at_least(0, "non-negative")
parse_seed = int_at_least(0, "non-negative", high=MAX_SEED)


def parse_tokens(text: str) -> Optional[int]:
    """``--tokens``: a number of rows in [2, 2^53] (``1e5`` allowed) or ``all`` (None)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return parse_count(text, low=2, high=MAX_COUNT, what="row-count")
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{str(e)[:-1]}; a spectrum needs at least 2 rows, or pass 'all'.") from None


#: (field, least value, largest value) of the shared numbers :func:`check_numbers` bounds.
_BOUNDED = (("tokens", 1, MAX_COUNT), ("seq_len", 1, MAX_COUNT), ("batch_size", 1, MAX_COUNT), ("seed", 0, MAX_SEED))


def check_numbers(cfg) -> None:
    """The Python API's counterpart of the flags' parsers: a config's shared numbers (tokens,
    seq_len, batch_size, seed, those it has) are whole, finite and within their bounds; a text
    value is left to the command (``"all"``). Raises UserError naming the option."""
    for name, low, high in _BOUNDED:
        v = getattr(cfg, name, None)
        if v is None or isinstance(v, str):
            continue
        whole = (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, float) and math.isfinite(v) and v == int(v))
        if not whole or not low <= int(v) <= high:
            raise UserError(f"{name} (--{name.replace('_', '-')}) must be a whole number from {low} to {high:,}, "
                            f"got {v!r}.")


def parse_max_memory(text: str) -> str:
    """``--max-memory``: a size such as ``16GB`` (checked by :func:`rankest.runtime.memory.parse_size`,
    kept as text)."""
    try:
        parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--max-memory ", "", 1)) from None
    return text


def parse_passes(text: str):
    """``--passes``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= 1000:
        raise argparse.ArgumentTypeError(f"expected auto or a number of passes from 1 to 1000, got {text!r}.")
    return v


def parse_positions(text: str) -> str:
    """``--positions``: ``all``, ``last`` or ``stride:K`` with K ≥ 1."""
    if text in ("all", "last"):
        return text
    if text.startswith("stride:"):
        k = text.split(":", 1)[1]
        if k.isdigit() and 1 <= int(k) <= MAX_COUNT:
            return text
    raise argparse.ArgumentTypeError(f"expected all, last or stride:K with K ≥ 1, got {text!r}.")


# ---- the options every command that runs a model shares ---------------------------------------------
TEACHER_AND_CORPUS = "teacher and corpus"
EXECUTION = "execution"
OUTPUT = "output"

# (name, default, Option fields) of the options of every command that runs a model, in --help order.
_MODEL_OPTIONS = (
    ("teacher", None, dict(group=TEACHER_AND_CORPUS, help="short name (see `rankest teachers`), a local model folder, "
                                                          "ngram:N (an n-gram target), logits:FILE[::KEY] (an N×V "
                                                          "file of logits: .npy, .safetensors or HDF5), default: the "
                                                          "embedded SmolLM2-135M-Instruct")),
    ("revision", None, dict(group=TEACHER_AND_CORPUS, help="checkpoint of the teacher, e.g. step143000 for Pythia")),
    ("corpus", None, dict(group=TEACHER_AND_CORPUS, nargs="+",
                          help="NAME[:CONFIG[:SPLIT]] of a HF dataset, a short name (lee, wikitext-103, wikitext-2) "
                               "or local .txt/.jsonl/.parquet files; default: the embedded Lee corpus")),
    ("tokens", 16384, dict(group=TEACHER_AND_CORPUS, type=parse_tokens,
                           help="target rows (contexts) to sample, or 'all' (default 16384)")),
    ("seq_len", 256, dict(group=TEACHER_AND_CORPUS, type=positive_int,
                          help="window length fed to the teacher (default 256)")),
    ("positions", "all", dict(group=TEACHER_AND_CORPUS, type=parse_positions,
                              help="which positions of a window become rows: all | last | stride:K (default all)")),
    ("sample", "windows", dict(group=TEACHER_AND_CORPUS, choices=("windows", "rows"),
                               help="draw whole windows (default: the teacher runs on ≈ N tokens) or independent "
                                    "rows (a simple random sample of contexts, up to seq-len × the forward cost)")),
    ("batch_size", 8, dict(group=EXECUTION, type=positive_int, help="windows per forward pass (default 8)")),
    ("device", "auto", dict(group=EXECUTION, help="cpu | cuda | cuda:i | auto (default auto)")),
    ("device_map", None, dict(group=EXECUTION, choices=DEVICE_MAPS,
                              help="a teacher too large for one GPU: spread its layers over this process's visible "
                                   "GPUs (accelerate); one process, not under torchrun")),
    ("dtype", "auto", dict(group=EXECUTION, choices=("auto", "bf16", "fp16", "fp32", "fp64"),
                           help="teacher dtype; auto = bf16 on GPU, fp32 on CPU")),
    ("max_memory", None, dict(group=EXECUTION, type=parse_max_memory,
                              help="memory budget for accumulators, e.g. 16GB (default: half the free memory)")),
    ("seed", 0, dict(group=EXECUTION, type=parse_seed, help="seed of every random choice (default 0)")),
    ("out", None, dict(group=OUTPUT, help="run folder to write (results.h5, results.json, report.md, PNGs)")),
    ("overwrite", False, dict(group=OUTPUT, help="replace the results of an existing run folder")),
    ("quiet", False, dict(group=OUTPUT, help="no progress bar")),
)
#: name → (default, Option) of the options every command that runs a model shares: the same flag,
#: default and help everywhere, first in --help in this order.
MODEL_OPTIONS: dict[str, tuple[Any, Option]] = {name: (default, Option(shared=i, **spec))
                                                for i, (name, default, spec) in enumerate(_MODEL_OPTIONS)}


def shared_option(name: str) -> Any:
    """The dataclass field of the shared option ``name`` of :data:`MODEL_OPTIONS`."""
    default, spec = MODEL_OPTIONS[name]
    return dataclasses.field(default=default, metadata={METADATA_KEY: spec})


CHECKPOINTS = "checkpoints (need --out)"


def checkpoint_every_option(*, unit: str, what: str) -> Any:
    """``--checkpoint-every UNIT``, the same sentence for every command that checkpoints."""
    return option(None, type=positive_int, metavar=unit, group=CHECKPOINTS,
                  help=f"write DIR/checkpoint.h5 every {unit} {what} (always on SIGINT/SIGTERM with --out)")


def resume_option(*, run: str) -> Any:
    """``--resume`` of a command that checkpoints (the run / sweep in --out)."""
    return option(False, group=CHECKPOINTS,
                  help=f"continue the {run} in --out from its checkpoint.h5 (starts afresh when there is none)")


# ---- from the fields --------------------------------------------------------------------------------
def _spec(f: dataclasses.Field) -> Option:
    """A field's Option; a field declared without :func:`option` is a Python-only option."""
    return f.metadata.get(METADATA_KEY) or Option(cli=False)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def option_fields(config_cls, *, cli: Optional[bool] = None) -> list[tuple[str, Any, Option]]:
    """(name, default, Option) of every field of ``config_cls`` (only the CLI ones with
    ``cli=True``, only the Python-only ones with ``cli=False``), in field order."""
    out = [(f.name, _default(f), _spec(f)) for f in dataclasses.fields(config_cls)]
    return [o for o in out if cli is None or o[2].cli == cli]


def _argparse_kwargs(name: str, default: Any, spec: Option) -> tuple[str, dict]:
    kw: dict[str, Any] = dict(dest=name, default=default, help=spec.help)
    action = spec.action
    flag = spec.flag
    if action is None and isinstance(default, bool):
        action = "store_false" if default else "store_true"
    if flag is None:
        flag = ("--no-" if action == "store_false" else "--") + name.replace("_", "-")
    if action is not None:
        kw["action"] = action
    for key in ("type", "choices", "metavar", "nargs"):
        value = getattr(spec, key)
        if value is not None:
            kw[key] = list(value) if key == "choices" else value
    return flag, kw


def add_arguments(parser: argparse.ArgumentParser, config_cls, *, groups: Optional[Sequence[str]] = None,
                  exclude: Iterable[str] = (), unused: Iterable[str] = ()) -> None:
    """Add the CLI options of ``config_cls`` (its fields with ``cli=True``) to ``parser``.

    Each goes into the argument group of its ``group`` title (created, or the parser's group of
    that title when it has one). The shared options (:data:`MODEL_OPTIONS`) come first, in their
    order, then the config's own in field order; the groups in the order their first option
    comes. ``groups``: only the options of these groups, the groups in this order.
    ``exclude``: fields left out. ``unused``: shared options that the command accepts like every
    model command does, though its config has no such field (parsed, then ignored).
    """
    exclude = set(exclude)
    names = {f.name: i for i, f in enumerate(dataclasses.fields(config_cls))}
    todo = [o for o in option_fields(config_cls, cli=True) if o[0] not in exclude]
    for name in unused:
        if name in names:
            raise ValueError(f"{config_cls.__name__} has a field {name!r}: `unused` names shared options it lacks")
        todo.append((name, *MODEL_OPTIONS[name]))
    todo.sort(key=lambda o: (0, o[2].shared) if o[2].shared is not None else (1, names[o[0]]))
    order = list(dict.fromkeys(o[2].group for o in todo)) if groups is None else list(groups)
    existing = {g.title: g for g in parser._action_groups}
    for title in order:
        target = parser if title is None else existing.get(title) or parser.add_argument_group(title)
        existing[title] = target
        for name, default, spec in todo:
            if spec.group == title:
                flag, kw = _argparse_kwargs(name, default, spec)
                target.add_argument(flag, **kw)


def config_from_args(config_cls, args: argparse.Namespace):
    """The config of a parsed command line: its CLI options from ``args`` (an option of
    ``nargs="+"`` given one value is that value: ``--corpus a.txt`` is the corpus "a.txt"), its
    Python-only ones at their defaults. Not checked yet: the command's function checks it."""
    kwargs = {}
    for name, _, spec in option_fields(config_cls, cli=True):
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if spec.nargs in ("+", "*") and isinstance(value, list) and len(value) == 1:
            value = value[0]
        kwargs[name] = value
    return config_cls(**kwargs)


def to_kwargs(config) -> dict[str, Any]:
    """A config's fields as keyword arguments of its command's function (values not copied: a
    loaded teacher stays the same object)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


# ---- the Python API ---------------------------------------------------------------------------------
def _hints(config_cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is shown as written
        return {f.name: f.type for f in dataclasses.fields(config_cls)}


def options_doc(config_cls) -> str:
    """The docstring section listing every option of ``config_cls``: name, default, flag, help."""
    lines = [f"Options (keyword-only; the fields of :class:`{config_cls.__module__}.{config_cls.__qualname__}`):", ""]
    for name, default, spec in option_fields(config_cls):
        head = f"{name} = {default!r}"
        if spec.cli:
            head += f"  [{_argparse_kwargs(name, default, spec)[0]}]"
        lines.append("    " + head)
        if spec.help:
            lines += textwrap.wrap(spec.help, 96, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


def keyword_options(config_cls) -> Callable[[Callable], Callable]:
    """Decorator: the signature of ``fn(*, own..., **kwargs)`` becomes the keyword-only
    parameters of ``config_cls``'s fields (their defaults and annotations) followed by ``fn``'s
    own keyword-only ones, and its docstring gains :func:`options_doc`. Calls are unchanged:
    ``fn`` still receives ``**kwargs`` and rejects unknown names itself."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        hints = _hints(config_cls)
        params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                    annotation=hints.get(name, inspect.Parameter.empty))
                  for name, default, _ in option_fields(config_cls)]
        own = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
               and p.name not in {q.name for q in params}]
        fn.__signature__ = sig.replace(parameters=params + own)
        doc = inspect.cleandoc(fn.__doc__) if fn.__doc__ else ""
        fn.__doc__ = (doc + "\n\n" if doc else "") + options_doc(config_cls)
        return fn

    return wrap
