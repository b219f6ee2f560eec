"""Command line: ``python -m rankest <command> [options]`` (also the ``rankest`` script).

Exit status: 0 on success; 2 on bad input (one sentence on stderr saying what and how to fix);
1 on an internal failure (traceback only under ``--debug``).

The options of the commands that run a model are the fields of their config dataclasses
(``EstimateConfig``, ``HeadsConfig``, ``AnisotropyConfig``, ``HeadSpectrumConfig``,
``SaturationConfig``), turned into argparse options and back by :mod:`rankest.options`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from rankest._version import __version__
from rankest.accumulate.sketch import sketch_line
from rankest.diagnostics.commands import run_anisotropy, run_head_spectrum
from rankest.diagnostics.config import AnisotropyConfig, HeadSpectrumConfig
from rankest.errors import UserError
from rankest.estimator.config import EstimateConfig
from rankest.estimator.pipeline import run_estimate
from rankest.heads.config import HeadsConfig
from rankest.heads.pipeline import run_heads
from rankest.io.files import check_name_lengths, check_writable_folder
from rankest.options import add_arguments, config_from_args, to_kwargs
from rankest.report.compare import compare_runs
from rankest.report.estimate import summary_lines
from rankest.report.folder import check_comparable, render_folder
from rankest.saturation.config import SaturationConfig
from rankest.saturation.pipeline import run_saturation
from rankest.runtime.run import release_all
from rankest.sources.teachers import DEFAULT_TEACHER, TEACHERS
from rankest.sources.tokenizers import setup_tokenizers

EPILOG_ESTIMATE = """examples:
  python -m rankest estimate                                   # embedded SmolLM2-135M on the embedded corpus, offline
  python -m rankest estimate --teacher pythia-6.9b --corpus wikitext-103 --tokens 200000 --out runs/p69
  python -m rankest estimate --teacher pythia-160m --space prob --route gram --tokens 50000
  python -m rankest estimate --teacher ./my-model --corpus data/*.jsonl --positions stride:16
  python -m rankest estimate --teacher ngram:5 --tokenizer pythia --space prob --corpus lee   # the paper's Fig. 7
"""

EPILOG_ANISOTROPY = """examples:
  python -m rankest anisotropy --tokens 4096 --out runs/aniso             # embedded SmolLM2, every layer
  python -m rankest anisotropy --teacher pythia-70m --revisions step1000,step143000 --tokens 8192 --out runs/a70m
  python -m rankest anisotropy --teacher runs/ckpts --revisions step100,step200 --out runs/a --resume
"""

EPILOG_HEAD_SPECTRUM = """examples:
  python -m rankest head-spectrum --out runs/hs                           # embedded SmolLM2
  python -m rankest head-spectrum --teacher pythia-160m --revisions step1000,step64000,step143000 --out runs/hs160m
"""


EPILOG_HEADS = """examples:
  python -m rankest heads --ranks 8,32,128,full --init svd --lr 1e-4 --steps 200 --tokens 2048 --seq-len 128 \
      --batch-size 2 --val-tokens 1024 --cache-features feats.h5 --out runs/heads    # embedded teacher, CPU
  python -m rankest heads --ranks 8,32,128,full --family linear,mos:4,sigsoftmax,mlp:64 --match-params --seeds 3 \
      --init svd --lr 1e-4 --steps 200 --out runs/families    # families at equal parameters, with intervals
  python -m rankest heads --teacher pythia-1b --corpus wikitext-103 --tokens 2000000 --batch-size 64 \\
      --ranks 32,64,128,256,512,1024,2048,full --cache-features feats.h5 --out runs/heads-p1b
"""

EPILOG_SATURATION = """examples:
  python -m rankest saturation --evals pythia/evals/pythia-v1 --metric lambada_openai:ppl --out runs/sat
  python -m rankest saturation --evals results/ --map names.json --metric arc_easy:acc --fit-on pythia-1b,pythia-2.8b,pythia-12b
  python -m rankest saturation --teachers pythia-70m,pythia-410m,pythia-1b,pythia-2.8b --revisions step1000,step143000 \\
      --corpus wikitext-103 --tokens 100000 --diagnostics --out runs/sat-own --checkpoint-every 50
"""

#: The shared model options of MODEL_OPTIONS about the corpus and its rows: head-spectrum accepts
#: them like every model command, though the head's spectrum reads no text.
CORPUS_OPTIONS = ("corpus", "tokens", "seq_len", "positions", "sample", "batch_size", "seed")


class UsageError(Exception):
    """A command line argparse refused: ``prog`` (``rankest estimate``) and argparse's message."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing the usage and exiting, so
    :func:`main` prints the one sentence and one line pointing at ``--help``."""

    def error(self, message: str):
        raise UsageError(self.prog, message)


def one_line(text: str) -> str:
    """``text`` on one line: control characters a user typed (``\\r``, ``\\n``, ``\\x1b``) are shown
    escaped, so the sentence that echoes them stays one line of the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def usage_sentence(err: UsageError) -> str:
    """argparse's message as one sentence: ``argument --seed: expected …`` → ``--seed: expected …``."""
    text = str(err).strip()
    if text.startswith("argument "):
        text = text[len("argument "):]
    return text if text.endswith((".", "?", ")")) else text + "."


def unknown_options(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """The sentence for arguments no option of ``parser`` takes, with the closest option for
    each (``--tokns`` → ``--tokens``)."""
    known = [o for a in parser._actions for o in a.option_strings]
    flags = [x for x in extras if x.startswith("-")]
    parts = []
    for x in flags or extras:  # the value after an unknown flag is not an argument of its own
        flag = x.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) if flag.startswith("-") else []
        parts.append(f"{x} (did you mean {close[0]}?)" if close else x)
    return f"unrecognized argument{'s' if len(parts) > 1 else ''}: {', '.join(parts)}."


def build_parser() -> argparse.ArgumentParser:

    parser = Parser(
        prog="rankest", description="How high is the rank of a language model's target distribution?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python -m rankest COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"rankest {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks on internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("estimate", help="stream a teacher over a corpus and estimate its target spectrum",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_ESTIMATE)
    add_arguments(p, EstimateConfig)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    for name, helptext, epilog in (
            ("anisotropy", "anisotropy (mean pairwise cosine) of every layer, per checkpoint", EPILOG_ANISOTROPY),
            ("head-spectrum", "singular spectrum and singular entropy of the output head, per checkpoint "
                              "(corpus options are not used)", EPILOG_HEAD_SPECTRUM)):
        d = sub.add_parser(name, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
        if name == "anisotropy":
            add_arguments(d, AnisotropyConfig, unused=("max_memory",))
        else:
            add_arguments(d, HeadSpectrumConfig, unused=CORPUS_OPTIONS + ("max_memory",))
        d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    t = sub.add_parser("teachers", help="list the teachers known by short name")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    h = sub.add_parser("heads", help="fit rank-constrained heads W = A·B on a frozen teacher's features",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_HEADS)
    add_arguments(h, HeadsConfig, unused=("max_memory",))
    h.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    rp = sub.add_parser("report", help="re-render a run folder's report (estimate, heads, anisotropy, "
                                       "head-spectrum, saturation), or compare several estimate run folders")
    rp.add_argument("folders", nargs="+", help="one run folder (any command's --out), or several `estimate` folders "
                                               "to compare")
    rp.add_argument("--out", help="folder for the comparison (default: the first folder)")
    rp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    sa = sub.add_parser("saturation", help="metric across checkpoints and sizes vs a scaling law: which models "
                                           "saturate, when, and by how much they miss the law",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_SATURATION)
    add_arguments(sa, SaturationConfig)
    sa.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    st = sub.add_parser("setup-tokenizers", help="extract Pythia's and GPT-2's tokenizers from a PyPI sdist (once)")
    st.add_argument("--sdist", help="a llama-cpp-python sdist already downloaded (default: pip download it)")
    st.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def say_saved(out, files: str) -> None:
    """A command's last line: where ``files`` were written, or, without --out, that its results
    were shown and not kept."""
    if out:
        print(f"  wrote {out}/{files}")
    else:
        print(f"  nothing was saved (no --out); pass --out DIR to keep {files}")


def cmd_estimate(args) -> int:

    spec = run_estimate(**to_kwargs(config_from_args(EstimateConfig, args)))
    if spec is None:  # a process of a torchrun job other than rank 0: rank 0 reports
        return 0
    print(f"{spec.meta.get('teacher')} · {spec.space} · route {spec.route}: N = {spec.n_rows:,}, V' = {spec.n_cols:,}")
    for line in summary_lines(spec):
        print(f"  {line}")
    if spec.route == "sketch":
        print(f"  sketch: {sketch_line(spec.meta)}")
    if "contexts" in spec.meta:  # n-gram target
        print(f"  contexts C = {spec.meta['contexts']:,}, singleton share = {spec.meta['singleton_context_share']:.3f}, "
              f"smoothing {spec.meta['smoothing']}, weighting {spec.meta['weighting']}, tokenizer {spec.meta['tokenizer']}")
    say_saved(args.out, "results.h5, results.json, report.md")
    return 0


def cmd_teachers(args) -> int:

    print(f"{'name':28} {'hugging face id':40} {'d':>6} {'V_real':>7} {'V_logit':>7} {'context':>7}")
    for name, t in TEACHERS.items():
        mark = "  (default, embedded)" if name == DEFAULT_TEACHER else ""
        print(f"{name:28} {t.hf_id:40} {t.hidden_size:>6} {t.vocab_real:>7} {t.logit_width:>7} "
              f"{t.context_length:>7}{mark}")
    return 0


def cmd_report(args) -> int:

    folders = [Path(f) for f in args.folders]
    for folder in folders:
        check_name_lengths(folder, "report")
        if not folder.is_dir():
            raise UserError(f"report: {folder} is not a folder; pass run folders written by rankest (estimate, heads, anisotropy, head-spectrum).")
    if args.out:  # checked before any result is read: the comparison must be writable
        check_writable_folder(args.out, "--out")
    else:
        check_writable_folder(folders[0], "report", must_exist=True,
                              fix="pass --out DIR to write the report into another folder")
    if len(folders) == 1 and not args.out:
        path = render_folder(folders[0])
    else:
        check_comparable(folders)
        path = compare_runs(folders, Path(args.out) if args.out else folders[0])
    print(f"wrote {path}")
    return 0


def cmd_anisotropy(args) -> int:

    results = run_anisotropy(**to_kwargs(config_from_args(AnisotropyConfig, args)))
    for label, r in results.items():
        a = r["anisotropy"]
        print(f"{label}: N = {int(r['n_rows']):,} rows, {len(a)} layers; anisotropy by depth: "
              + " ".join(f"{x:.3f}" for x in a))
    say_saved(args.out, "anisotropy.h5, anisotropy.json, report.md, anisotropy.png")
    return 0


def cmd_head_spectrum(args) -> int:

    results = run_head_spectrum(**to_kwargs(config_from_args(HeadSpectrumConfig, args)))
    for label, r in results.items():
        print(f"{label}: head {r['head_n_rows']:,} × {r['head_n_cols']}, σ_0 = {r['head_sigma'][0]:.4g}, "
              f"singular entropy KL(σ/Σσ‖u) = {r['head_singular_entropy_kl']:.4f} nats "
              f"(σ²: {r['head_singular_entropy_kl_sq']:.4f}; max log k = {r['head_singular_entropy_max']:.4f}), "
              f"effective rank = {r['head_effective_rank']:.1f}")
    say_saved(args.out, "head_spectrum.h5, head_spectrum.json, report.md, head_*.png")
    return 0


def cmd_heads(args) -> int:

    res = run_heads(**to_kwargs(config_from_args(HeadsConfig, args)))
    if res is None:  # a process of a torchrun job other than rank 0: rank 0 reports
        return 0
    m = res.meta
    print(f"{m['teacher']} · heads ({m['objective']}, init {m['init']}): {m['steps']} steps, "
          f"{m['n_train_rows']:,} training rows, {m['n_val_rows']:,} validation rows")
    print(f"  {'rank':>6} {'val loss':>9} {'accuracy':>9} {'trunc W':>9} {'W-err W':>8} {'trunc HWc':>9} "
          f"{'W-err HWc':>9}")
    for i, lab in enumerate(res.labels):
        print(f"  {lab:>6} {res.val_loss[i]:9.4f} {res.val_accuracy[i]:9.4f} {res.truncation_loss[i]:9.4f} "
              f"{res.head_w_error_weight[i]:8.3f} {res.truncation_loss_feature[i]:9.4f} "
              f"{res.head_w_error_feature[i]:9.3f}")
    print(f"  teacher {res.reference['loss']:9.4f} {res.reference['accuracy']:9.4f}")
    if res.families is not None:
        print("  head families (out rank: clr rank of the head's log-probs, σ > 1e-6·σ₁; num rank: largest gap)")
        print(f"  {'family':>10} {'rank':>6} {'params':>10} {'val loss':>9} {'± 95%':>7} {'out rank':>8} {'num rank':>8}")
        for g in res.families["groups"]:
            print(f"  {g['family']:>10} {g['label']:>6} {g['n_params']:>10,} {g['val_loss']:9.4f} "
                  f"{g['val_loss_ci95']:7.3f} {g['output_resolved_rank']:8.1f} {g['output_numerical_rank']:8.1f}")
        for name, k in res.families["knees"].items():
            print(f"  knee of {name}: " + ("none within the ranks" if k["rank"] is None else f"r = {k['rank']}")
                  + ("" if k["low"] is None else f" [{k['low']}, {k['high']}]"))
    say_saved(args.out, "heads.h5, heads.json, heads.md")
    return 0


def cmd_saturation(args) -> int:

    rec = run_saturation(**to_kwargs(config_from_args(SaturationConfig, args)))
    if rec is None:  # a process of a torchrun job other than rank 0: rank 0 reports
        return 0
    f = rec["fit"]
    print(f"{rec['metric']}: L(N) = {f['E']:.4g} + {f['A']:.4g}·N^(−{f['alpha']:.4g}) on {', '.join(rec['fit_on'])}")
    for name, m in rec["models"].items():
        onset = "" if m["onset_step"] is None else f", saturates from step {m['onset_step']}"
        print(f"  {name}: final {m['final']:.4g} (step {m['final_step']}), best {m['best']:.4g} (step {m['best_step']})"
              f"{onset}; worse than the law by {100 * m['deviation_final']:+.1f}% (final), "
              f"{100 * m['deviation_best']:+.1f}% (best)")
    if args.out:
        print(f"  wrote {args.out}/saturation.json, saturation.h5, saturation.md and PNGs")
    return 0


def cmd_setup_tokenizers(args) -> int:

    for name, path in setup_tokenizers(sdist=args.sdist).items():
        print(f"{name}: {path}")
    return 0


COMMANDS = {"estimate": cmd_estimate, "teachers": cmd_teachers, "report": cmd_report, "heads": cmd_heads,
            "anisotropy": cmd_anisotropy, "head-spectrum": cmd_head_spectrum, "setup-tokenizers": cmd_setup_tokenizers,
            "saturation": cmd_saturation}


def _subparser(parser: argparse.ArgumentParser, command: Optional[str]) -> argparse.ArgumentParser:
    """The parser of ``command`` (the top-level parser when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; a refused command line raises :class:`UsageError` (unknown options with
    the closest known one)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = getattr(args, "command", None)
        sub = _subparser(parser, command)
        raise UsageError(sub.prog, unknown_options(sub, extras))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parse(parser, argv)
    except UsageError as e:
        print(f"rankest: error: {one_line(usage_sentence(e))}", file=sys.stderr)
        print(f"Run `python -m {e.prog} --help` for the options.", file=sys.stderr)
        return 2
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"rankest: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("rankest: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:  # noqa: BLE001 - the one place internal errors are turned into exit 1
        if args.debug:
            traceback.print_exc()
        else:
            print(f"rankest: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        return 1
    finally:
        release_all()  # the run folder's lock; a folder the failed run created and left empty goes


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
