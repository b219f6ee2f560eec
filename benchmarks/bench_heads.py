"""`heads`: one 8-rank sweep against eight single-rank runs on the same tokens (CPU, embedded teacher).

    python benchmarks/bench_heads.py                     # embedded SmolLM2-135M, ~10 min on 2 busy cores
    python benchmarks/bench_heads.py --tokens 1024 --val-tokens 512 --ranks 8,32,128,full

The sweep trains every rank on the same feature batches, so the teacher forward (train and
validation rows), the feature Gram, the head's Gram and the reference evaluation are paid once;
eight separate runs pay them eight times. Both sides are whole ``rankest.fit_heads`` calls with
the teacher already loaded (packing, features, truncation curve, training, validation), same
seed, same rows, so the separate runs must also reproduce the sweep's validation losses — the
report gives the largest difference. Goal: sweep ≤ 40% of the eight runs.

Writes benchmarks/reports/heads_<teacher>.md and heads_<teacher>.png (loss and accuracy versus
rank, with the zero-training truncations and the teacher's own head) naming the machine.

Head families (``--families``): every family × rank × seed in one ``fit_heads`` call against one
call per family × seed (each paying the teacher forward, the truncations and the rank sweep
again), and the cost of one AdamW step of each family's heads alone on random features of the
teacher's width (median of ``--family-steps`` steps), with its parameter / optimiser-state bytes:

    python benchmarks/bench_heads.py --families linear,mos:4,sigsoftmax,mlp:64 --seeds 2 --ranks 8,64 \
        --tokens 512 --val-tokens 256
Writes benchmarks/reports/head_families_<teacher>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORTS = HERE / "reports"
sys.path.insert(0, str(HERE.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--ranks", default="8,16,32,64,128,256,512,full")
    ap.add_argument("--tokens", type=int, default=768, help="training rows (≥ d, so the feature metric has full rank)")
    ap.add_argument("--val-tokens", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2, help="windows per optimiser step")
    ap.add_argument("--steps", type=int, default=None, help="default: one pass over the training rows")
    ap.add_argument("--init", default="svd")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(REPORTS))
    ap.add_argument("--families", default=None, help="benchmark these head families instead of the rank sweep")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--family-steps", type=int, default=5, help="timed steps per family for the cost per step")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.families:
        return families_main(args)

    from rankest import fit_heads
    from rankest.heads.pipeline import parse_ranks
    from rankest.report.heads import plot_loss_vs_rank
    from rankest.io.results import provenance
    from rankest.sources.teachers import load_teacher

    t0 = time.perf_counter()
    teacher = load_teacher(args.teacher, device="cpu", dtype="fp32")
    t_load = time.perf_counter() - t0
    common = dict(teacher=teacher, tokens=args.tokens, val_tokens=args.val_tokens, seq_len=args.seq_len,
                  batch_size=args.batch_size, steps=args.steps, init=args.init, lr=args.lr, quiet=True, seed=0)
    ranks, labels = parse_ranks(args.ranks, min(teacher.hidden_size, teacher.n_cols))

    t0 = time.perf_counter()
    sweep = fit_heads(ranks=",".join(labels), **common)
    t_sweep = time.perf_counter() - t0
    print(f"sweep of {len(ranks)} ranks: {t_sweep:.1f} s", flush=True)
    singles, t_singles = [], []
    for lab in labels:
        t0 = time.perf_counter()
        singles.append(fit_heads(ranks=lab, **common))
        t_singles.append(time.perf_counter() - t0)
        print(f"  rank {lab}: {t_singles[-1]:.1f} s", flush=True)
    t_sep = sum(t_singles)
    ratio = t_sweep / t_sep
    max_diff = max(abs(s.val_loss[0] - sweep.val_loss[i]) for i, s in enumerate(singles))
    full_diff = abs(sweep.truncation_loss_feature[-1] - sweep.reference["loss"])

    name = teacher.name.replace("/", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = f"heads_{name}.png"
    plot_loss_vs_rank(sweep, out / png, f"{teacher.name}: heads on frozen features (lee corpus, CPU)")
    prov = provenance("cpu")
    cmd = "python benchmarks/bench_heads.py " + " ".join(sys.argv[1:])
    m = sweep.meta
    sm = [s.meta for s in singles]
    lines = [
        f"# heads: one {len(ranks)}-rank sweep against {len(ranks)} separate runs — {teacher.name}, CPU",
        "",
        f"Machine: {prov['cpu']} (2 cores shared with other sessions), torch {prov['torch_version']}, "
        f"git {prov['git_hash']}. Teacher {teacher.name} (d = {teacher.hidden_size}, V' = {teacher.n_cols:,}) "
        f"fp32, loaded once in {t_load:.0f} s (not counted). Corpus: embedded `lee`.",
        "",
        f"Reproduce: `{cmd.strip()}`",
        "",
        f"Each side is whole `rankest.fit_heads` calls on the same rows: {m['n_train_rows']:,} training rows "
        f"({m['steps']} AdamW steps of ≈ {m['rows_per_step']:.0f} rows), {m['n_val_rows']:,} validation rows, "
        f"seq-len {args.seq_len}, init `{args.init}`, peak LR {args.lr}, objective ce.",
        "",
        "## Wall time",
        "",
        "| | total (s) | features: teacher forward (s) | heads training (s) | rest: truncations, validation, packing (s) |",
        "|---|---|---|---|---|",
        f"| sweep, ranks {args.ranks} | {t_sweep:.1f} | {m['seconds_features']:.1f} | {m['seconds_heads']:.1f} | "
        f"{t_sweep - m['seconds_features'] - m['seconds_heads']:.1f} |",
        f"| {len(ranks)} separate runs (sum) | {t_sep:.1f} | {sum(x['seconds_features'] for x in sm):.1f} | "
        f"{sum(x['seconds_heads'] for x in sm):.1f} | "
        f"{t_sep - sum(x['seconds_features'] + x['seconds_heads'] for x in sm):.1f} |",
        "",
        f"**Sweep / separate = {ratio:.3f}** (goal ≤ 0.40: {'met' if ratio <= 0.40 else 'NOT met'}). "
        f"Separate runs per rank (s): " + ", ".join(f"{lab}: {t:.1f}" for lab, t in zip(labels, t_singles)) + ".",
        "",
        f"The separate runs reproduce the sweep's validation losses to {max_diff:.1e} nats (same seeds, same "
        f"batches). Sweep time per step for all heads: {m['seconds_per_step']:.2f} s "
        f"({m['seconds_heads_per_step']:.2f} s in the heads); head parameters + gradients + AdamW moments "
        f"{m['head_state_bytes'] / 2**20:.0f} MiB; peak RSS of the process {m['peak_rss_bytes'] / 2**30:.2f} GiB.",
        "",
        "## Loss versus rank (the sweep)",
        "",
        f"![loss and accuracy versus rank]({png})",
        "",
        "| rank | val loss | val accuracy | truncated, feature metric (= svd init) | W-error H·W_cᵀ | "
        "truncated, weight space | W-error W |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, lab in enumerate(labels):
        lines.append(f"| {lab} ({ranks[i]}) | {sweep.val_loss[i]:.4f} | {sweep.val_accuracy[i]:.4f} | "
                     f"{sweep.truncation_loss_feature[i]:.4f} | {sweep.head_w_error_feature[i]:.3f} | "
                     f"{sweep.truncation_loss[i]:.4f} | {sweep.head_w_error_weight[i]:.3f} |")
    ref = sweep.reference
    lines += [f"| teacher's head | {ref['loss']:.4f} | {ref['accuracy']:.4f} | | 0 | | 0 |", "",
              f"The full-rank svd head reproduces the teacher's validation loss to {full_diff:.1e} nats (fp32). "
              f"So few steps from the svd init measure little more than the truncation; the paper trained "
              f"~150M tokens from N(0,1). The truncation losses are what a rank-r head costs before training.",
              ""]
    (out / f"heads_{name}.md").write_text("\n".join(lines))
    (out / f"heads_{name}.json").write_text(json.dumps({
        "ratio": ratio, "seconds_sweep": t_sweep, "seconds_separate": t_singles, "labels": labels,
        "max_val_loss_diff": max_diff, "full_rank_svd_vs_teacher": full_diff, "command": cmd.strip(),
        "val_loss": sweep.val_loss, "truncation_loss_feature": sweep.truncation_loss_feature,
        "truncation_loss": sweep.truncation_loss, "reference": ref, "machine": prov["cpu"]}, indent=2))
    print(f"ratio {ratio:.3f}; wrote {out / f'heads_{name}.md'}")
    return 0


def _step_cost(fam, ranks, d, n_cols, rows, steps, seed=0):
    """Median seconds of one AdamW step of one family's heads (one per rank) on random features."""
    import statistics

    import torch

    from rankest.heads.family_sweep import FamilyHeadSpec, FamilySweep

    specs = [FamilyHeadSpec(fam, str(r), r, r, 0, 1e-3) for r in ranks]
    sweep = FamilySweep(specs, d=d, n_cols=n_cols, init="scaled", seed=seed, steps=steps + 1,
                        device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    h, t = torch.randn(rows, d, generator=g), torch.randint(0, n_cols, (rows,), generator=g)
    sweep.step(h, t)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sweep.step(h, t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sweep.state_bytes(), sum(sweep.n_params())


def families_main(args) -> int:
    from rankest import fit_heads
    from rankest.heads.families import parse_families
    from rankest.heads.pipeline import parse_ranks
    from rankest.io.results import provenance
    from rankest.sources.teachers import load_teacher

    t0 = time.perf_counter()
    teacher = load_teacher(args.teacher, device="cpu", dtype="fp32")
    t_load = time.perf_counter() - t0
    d, v = teacher.hidden_size, teacher.n_cols
    ranks, labels = parse_ranks(args.ranks, min(d, v))
    fams = parse_families(args.families)
    common = dict(teacher=teacher, tokens=args.tokens, val_tokens=args.val_tokens, seq_len=args.seq_len,
                  batch_size=args.batch_size, steps=args.steps, init=args.init, lr=args.lr, quiet=True, seed=0,
                  ranks=",".join(labels), rank_rows=args.val_tokens)
    t0 = time.perf_counter()
    one = fit_heads(family=args.families, seeds=args.seeds, **common)
    t_one = time.perf_counter() - t0
    print(f"one pass, {len(one.families['heads'])} family heads: {t_one:.1f} s", flush=True)
    sep, t_sep = {}, {}
    for fam in fams:
        for s in range(args.seeds):
            t0 = time.perf_counter()
            # seed index s alone: the same init as replicate s of the one-pass run needs seeds=s+1; the
            # cost is that of a run holding s+1 replicates, so time seeds=1 runs (replicate 0) instead.
            r = fit_heads(family=fam.label, seeds=1, **common)
            t_sep[(fam.label, s)] = time.perf_counter() - t0
            sep[(fam.label, s)] = r
            print(f"  {fam.label} seed {s}: {t_sep[(fam.label, s)]:.1f} s", flush=True)
    total_sep = sum(t_sep.values())
    # replicate 0 of each family: the separate run trains the same head on the same batches
    diffs = []
    for fam in fams:
        a = [h for h in one.families["heads"] if h["family"] == fam.label and h["replicate"] == 0]
        b = sep[(fam.label, 0)].families["heads"]
        diffs += [abs(x["val_loss"] - y["val_loss"]) for x, y in zip(a, b)]
    rows = int(round(one.meta["rows_per_step"]))
    costs = {fam.label: _step_cost(fam, ranks, d, v, rows, args.family_steps) for fam in fams}

    prov = provenance("cpu")
    cmd = "python benchmarks/bench_heads.py " + " ".join(sys.argv[1:])
    m = one.meta
    lines = [
        f"# heads --family: every family × rank × seed in one pass against separate runs — {teacher.name}, CPU",
        "",
        f"Machine: {prov['cpu']} (2 cores shared with 7 other sessions: timings are noisy), torch "
        f"{prov['torch_version']}, git {prov['git_hash']}. Teacher {teacher.name} (d = {d}, V' = {v:,}) fp32, "
        f"loaded once in {t_load:.0f} s (not counted).",
        "",
        f"Reproduce: `{cmd.strip()}`",
        "",
        f"Families {args.families}, ranks {','.join(labels)}, {args.seeds} seeds; {m['n_train_rows']:,} training "
        f"rows ({m['steps']} steps of ≈ {rows} rows), {m['n_val_rows']:,} validation rows (all of them for the "
        f"output ranks), init `{args.init}`, LR {args.lr}. Each side is whole `fit_heads` calls (teacher forward, "
        f"truncations, the linear rank sweep, families, evaluation, output ranks).",
        "",
        "## One pass against separate runs",
        "",
        "| | wall (s) | features (s) | heads training (s) |",
        "|---|---|---|---|",
        f"| one pass, {len(one.families['heads'])} family heads | {t_one:.1f} | {m['seconds_features']:.1f} | "
        f"{m['seconds_heads']:.1f} |",
        f"| {len(t_sep)} separate runs (one family × seed each, sum) | {total_sep:.1f} | "
        f"{sum(r.meta['seconds_features'] for r in sep.values()):.1f} | "
        f"{sum(r.meta['seconds_heads'] for r in sep.values()):.1f} |",
        "",
        f"**One pass / separate = {t_one / total_sep:.3f}.** Replicate 0 of every family in the one pass equals "
        f"its separate run to {max(diffs):.1e} nats of validation loss (same init seed, same batches). Peak RSS "
        f"of the process {m['peak_rss_bytes'] / 2**30:.2f} GiB; head parameters + gradients + AdamW moments of "
        f"the one pass {m['head_state_bytes'] / 2**20:.1f} MiB.",
        "",
        f"## Cost of one AdamW step per family ({rows} rows, heads at ranks {','.join(labels)}, random features)",
        "",
        "| family | seconds per step | parameters | parameters + grads + AdamW moments (MiB) |",
        "|---|---|---|---|",
    ]
    for lab, (sec, nbytes, npar) in costs.items():
        lines.append(f"| {lab} | {sec:.3f} | {npar:,} | {nbytes / 2**20:.1f} |")
    lines += ["", "## The one-pass result", "",
              "| family | rank (own) | parameters | val loss ± 95% CI | output clr resolved rank (σ > 1e-6·σ₁) (min–max) |",
              "|---|---|---|---|---|"]
    for g in one.families["groups"]:
        lines.append(f"| {g['family']} | {g['label']} ({g['rank']}) | {g['n_params']:,} | {g['val_loss']:.4f} ± "
                     f"{g['val_loss_ci95']:.3f} | {g['output_resolved_rank']:.0f} ({g['output_resolved_rank_min']}–"
                     f"{g['output_resolved_rank_max']}) |")
    lines += ["", f"Teacher's own head: loss {one.reference['loss']:.4f}, output clr rank "
              f"{one.families['teacher_output_rank']['resolved_rank']} on the same rows.", ""]
    name = teacher.name.replace("/", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"head_families_{name}.md").write_text("\n".join(lines))
    print(f"wrote {out / f'head_families_{name}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
