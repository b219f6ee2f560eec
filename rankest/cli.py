"""Command line: ``python -m rankest <command> [options]`` (also the ``rankest`` script).

Exit status: 0 on success; 2 on bad input (one sentence on stderr saying what and how to fix);
1 on an internal failure (traceback only under ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional, Sequence

from .errors import UserError

EPILOG_ESTIMATE = """examples:
  python -m rankest estimate                                   # embedded SmolLM2-135M on the embedded corpus, offline
  python -m rankest estimate --teacher pythia-6.9b --corpus wikitext-103 --tokens 200000 --out runs/p69
  python -m rankest estimate --teacher pythia-160m --space prob --route gram --tokens 50000
  python -m rankest estimate --teacher ./my-model --corpus data/*.jsonl --positions stride:16
  python -m rankest estimate --teacher ngram:5 --tokenizer pythia --space prob --corpus lee   # the paper's Fig. 7
"""


def _int_at_least(low: int, what: str):
    """argparse type: an integer ≥ low (argparse turns the error into exit 2 with usage)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _tokens(text: str) -> Optional[int]:
    if text.lower() == "all":
        return None
    try:
        v = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows or 'all', got {text!r}") from None
    if v < 2:
        raise argparse.ArgumentTypeError(f"a spectrum needs at least 2 rows, got {text!r}")
    return v


def _positions(text: str) -> str:
    if text in ("all", "last"):
        return text
    if text.startswith("stride:"):
        k = text.split(":", 1)[1]
        if k.isdigit() and int(k) >= 1:
            return text
    raise argparse.ArgumentTypeError(f"expected all, last or stride:K with K ≥ 1, got {text!r}")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs a model (same names, same meanings)."""
    g = p.add_argument_group("teacher and corpus")
    g.add_argument("--teacher", help="short name (see `rankest teachers`), a local model folder, ngram:N (an n-gram target), "
                                     "default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--revision", help="checkpoint of the teacher, e.g. step143000 for Pythia")
    g.add_argument("--corpus", nargs="+", help="NAME[:CONFIG[:SPLIT]] of a HF dataset, a short name "
                                               "(lee, wikitext-103, wikitext-2) or local .txt/.jsonl/.parquet files; "
                                               "default: the embedded Lee corpus")
    g.add_argument("--tokens", type=_tokens, default=16384, help="target rows (contexts) to sample, or 'all' "
                                                                 "(default 16384)")
    g.add_argument("--seq-len", type=_positive_int, default=256, help="window length fed to the teacher (default 256)")
    g.add_argument("--positions", type=_positions, default="all", help="which positions of a window become rows: "
                                                                       "all | last | stride:K (default all)")
    g.add_argument("--sample", default="windows", choices=["windows", "rows"],
                   help="draw whole windows (default: the teacher runs on ≈ N tokens) or independent "
                        "rows (a simple random sample of contexts, up to seq-len × the forward cost)")
    e = p.add_argument_group("execution")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass (default 8)")
    e.add_argument("--device", default="auto", help="cpu | cuda | cuda:i | auto (default auto)")
    e.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp64"],
                   help="teacher dtype; auto = bf16 on GPU, fp32 on CPU")
    e.add_argument("--max-memory", help="memory budget for accumulators, e.g. 16GB (default: half the free memory)")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="seed of every random choice (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="run folder to write (results.h5, results.json, report.md, PNGs)")
    o.add_argument("--overwrite", action="store_true", help="replace the results of an existing run folder")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="rankest", description="How high is the rank of a language model's target distribution?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python -m rankest COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"rankest {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks on internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("estimate", help="stream a teacher over a corpus and estimate its target spectrum",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_ESTIMATE)
    add_model_options(p)
    r = p.add_argument_group("estimation")
    r.add_argument("--space", default="clr", choices=["clr", "prob", "logprob"],
                   help="target space: centred log-probs (default), probabilities, log-probs")
    r.add_argument("--route", default="auto", choices=["auto", "factor", "gram", "sketch"],
                   help="accumulation route (default auto: factor when exact, gram when it fits, else sketch)")
    r.add_argument("--rank-max", type=_positive_int, help="sketch size k / largest rank reported")
    r.add_argument("--gram-precision", default="fp64", choices=["fp64", "fast"],
                   help="Gram products in fp64 (default) or fp32 with an fp64 carry")
    r.add_argument("--no-convergence", dest="convergence", action="store_false",
                   help="skip the metrics at N/8, N/4, N/2")
    ng = p.add_argument_group("n-gram targets (--teacher ngram:N)")
    ng.add_argument("--tokenizer", help="pythia | gpt2 (after `rankest setup-tokenizers`) | smollm2 | a tokenizer "
                                        "folder, tokenizer.json or .gguf")
    ng.add_argument("--smoothing", default="mle", help="mle (the paper's, default) | add-k:K | kn (interpolated Kneser–Ney)")
    ng.add_argument("--min-count", type=_positive_int, default=1, help="use contexts seen at least M times (default 1)")
    ng.add_argument("--contexts", default="all", help="all (default) or C contexts sampled with --seed")
    ng.add_argument("--weighting", default="equal", choices=["equal", "count"],
                    help="rows weighted equally (the paper's) or by context count")
    ng.add_argument("--corpus-fractions", help="also run on these prefixes of the corpus, e.g. 0.125,0.25,0.5,1")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    t = sub.add_parser("teachers", help="list the teachers known by short name")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    rp = sub.add_parser("report", help="re-render a run folder's report, or compare several run folders")
    rp.add_argument("folders", nargs="+", help="run folders written by `estimate`")
    rp.add_argument("--out", help="folder for the comparison (default: the first folder)")
    rp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    st = sub.add_parser("setup-tokenizers", help="extract Pythia's and GPT-2's tokenizers from a PyPI sdist (once)")
    st.add_argument("--sdist", help="a llama-cpp-python sdist already downloaded (default: pip download it)")
    st.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def cmd_estimate(args) -> int:
    from .estimator import run_estimate

    corpus = args.corpus[0] if args.corpus and len(args.corpus) == 1 else args.corpus
    spec = run_estimate(teacher=args.teacher, revision=args.revision, corpus=corpus, tokens=args.tokens,
                        seq_len=args.seq_len, space=args.space, route=args.route, rank_max=args.rank_max,
                        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        max_memory=args.max_memory, seed=args.seed, positions=args.positions, sample=args.sample,
                        gram_precision=args.gram_precision, out=args.out, overwrite=args.overwrite,
                        quiet=args.quiet, convergence=args.convergence, tokenizer=args.tokenizer,
                        smoothing=args.smoothing, min_count=args.min_count, contexts=args.contexts,
                        weighting=args.weighting, corpus_fractions=args.corpus_fractions)
    m = spec.metrics()
    r = m["rank_at"]
    print(f"{spec.meta.get('teacher')} · {spec.space} · route {spec.route}: N = {spec.n_rows:,}, V' = {spec.n_cols:,}")
    print(f"  rank_at(0.5) = {r['0.5']}, rank_at(0.1) = {r['0.1']}, rank_at(0.01) = {r['0.01']}")
    print(f"  numerical rank = {m['numerical_rank']}, effective rank = {m['effective_rank']:.1f}, "
          f"stable rank = {m['stable_rank']:.2f}, off-model energy = {m['off_model_energy']:.2e}")
    print(f"  teacher NLL = {spec.meta.get('nll'):.4f} nats (perplexity {spec.meta.get('perplexity'):.2f})")
    if "contexts" in spec.meta:  # n-gram target
        print(f"  contexts C = {spec.meta['contexts']:,}, singleton share = {spec.meta['singleton_context_share']:.3f}, "
              f"smoothing {spec.meta['smoothing']}, weighting {spec.meta['weighting']}, tokenizer {spec.meta['tokenizer']}")
    if args.out:
        print(f"  wrote {args.out}/results.h5, results.json, report.md")
    return 0


def cmd_teachers(args) -> int:
    from .teachers import DEFAULT_TEACHER, TEACHERS

    print(f"{'name':28} {'hugging face id':40} {'d':>6} {'V_real':>7} {'V_logit':>7} {'context':>7}")
    for name, t in TEACHERS.items():
        mark = "  (default, embedded)" if name == DEFAULT_TEACHER else ""
        print(f"{name:28} {t.hf_id:40} {t.hidden_size:>6} {t.vocab_real:>7} {t.logit_width:>7} "
              f"{t.context_length:>7}{mark}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from .report import compare_runs, write_report
    from .results import read_spectrum_h5

    folders = [Path(f) for f in args.folders]
    if len(folders) == 1 and not args.out:
        import json

        import h5py

        spec = read_spectrum_h5(folders[0] / "results.h5")
        with h5py.File(folders[0] / "results.h5", "r") as f:
            config = json.loads(f.attrs.get("config", f["/"].attrs.get("config", "{}")))
            prov = json.loads(f["/"].attrs.get("provenance", "{}"))
        path = write_report(folders[0], spec, config=config, prov=prov)
    else:
        path = compare_runs(folders, Path(args.out) if args.out else folders[0])
    print(f"wrote {path}")
    return 0


def cmd_setup_tokenizers(args) -> int:
    from .offline_tokenizers import setup_tokenizers

    for name, path in setup_tokenizers(sdist=args.sdist).items():
        print(f"{name}: {path}")
    return 0


COMMANDS = {"estimate": cmd_estimate, "teachers": cmd_teachers, "report": cmd_report,
            "setup-tokenizers": cmd_setup_tokenizers}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"rankest: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rankest: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place internal errors are turned into exit 1
        if args.debug:
            traceback.print_exc()
        else:
            print(f"rankest: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
