import math
import resource
import time
import warnings
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from rankest.errors import UserError
from rankest.heads.config import LR_SEARCH_FACTORS, MIN_VAL_ROWS, HeadsConfig
from rankest.heads.evaluate import _logits, evaluate_heads
from rankest.heads.family_fit import family_specs, family_table, families_of, output_spectra, worse_than_init
from rankest.heads.family_sweep import FamilySweep
from rankest.heads.features import (FeatureSource, Split, cache_attrs, check_cache, global_rows, split_windows,
                                    write_cache)
from rankest.heads.result import HeadsResult, write_heads_run
from rankest.heads.sweep import HeadSpec, HeadSweep, paper_lr, parse_ranks
from rankest.heads.truncation import feature_truncations, head_moments, weight_truncations
from rankest.io.files import check_name_lengths, check_writable_file, now_iso
from rankest.io.h5 import os_error_text
from rankest.io.results import provenance
from rankest.runtime import distributed
from rankest.runtime.run import Run, release_run_folder, result_config, run_config
from rankest.sources.corpus import DEFAULT_CORPUS, corpus_name, windows_for
from rankest.sources.rows import plan_rows, rows_fingerprint, rows_per_window, windows_needed
from rankest.sources.teachers import DEFAULT_TEACHER, check_linear_head, teacher_and_documents


def run_heads(**kwargs) -> Optional[HeadsResult]:
    """Fit rank-constrained heads on a frozen teacher (the Python API of ``rankest heads``).

    Keyword arguments are the fields of :class:`HeadsConfig` (``teacher`` may be a loaded
    :class:`~rankest.sources.teachers.Teacher`; ``corpus`` may be a (W, seq_len + 1) tensor of
    pre-tokenised windows). Returns a :class:`HeadsResult`; writes heads.h5, heads.json and the
    report into ``out`` when given. Under torchrun (``WORLD_SIZE`` > 1) every process trains on
    its shard of each batch; rank 0 alone writes and returns the result (the others: None).
    """
    unknown = set(kwargs) - set(HeadsConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    cfg = HeadsConfig(**kwargs)
    cfg.teacher = DEFAULT_TEACHER if cfg.teacher is None else cfg.teacher
    cfg.corpus = DEFAULT_CORPUS if cfg.corpus is None else cfg.corpus
    cfg.validate()
    if isinstance(cfg.ranks, str):  # syntax errors before anything is loaded
        parse_ranks(cfg.ranks, 1 << 30)
    with distributed.joined(cfg.device) as (world, run_device):
        try:
            return _heads(cfg, world, run_device)
        finally:
            if cfg.out:
                release_run_folder(Path(cfg.out))  # done or failed, the folder is free again


def _heads(cfg: HeadsConfig, world, run_device: str) -> Optional[HeadsResult]:
    """The body of :func:`run_heads` for one process of ``world``."""
    cache_path = Path(cfg.cache_features) if cfg.cache_features else None
    if cache_path is not None:
        check_name_lengths(cache_path, "--cache-features")
    if cache_path is not None and cache_path.exists() and not cache_path.is_file():
        raise UserError(f"--cache-features {cache_path} is not a file; pass a file path such as feats.h5.")
    if cache_path is not None and not cache_path.exists() and world.main:  # written after the teacher loads
        check_writable_file(cache_path, "--cache-features")
    run = Run.open("heads", out=cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, results_file="heads.h5",
                   config=_heads_run_config(cfg), world=world, every=cfg.checkpoint_every, what="sweep")
    started, t0 = now_iso(), time.perf_counter()
    teacher, docs = teacher_and_documents(cfg.teacher, cfg.corpus, revision=cfg.revision, device=run_device,
                                          dtype=cfg.dtype, seq_len=cfg.seq_len, quiet=cfg.quiet,
                                          device_map=cfg.device_map)
    d, n_cols = teacher.hidden_size, teacher.n_cols
    full = min(d, n_cols)
    ranks, labels = parse_ranks(cfg.ranks, full)
    weight, bias = teacher.head()
    weight = weight[:n_cols]  # real vocabulary columns only (V'), consistently everywhere
    bias = None if bias is None else bias[:n_cols]
    head_dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    device = teacher.device
    corpus_label = corpus_name(cfg.corpus)

    # Windows and the seeded validation / training split.
    per_window = rows_per_window(cfg.positions, cfg.seq_len)
    max_windows = windows_needed(None if cfg.tokens is None else cfg.tokens + cfg.val_tokens, cfg.seq_len,
                                 cfg.positions)
    windows = windows_for(cfg.corpus, docs, teacher.tokenizer, cfg.seq_len, max_windows=max_windows,
                          progress=not cfg.quiet and world.main)
    val_idx, train_idx = split_windows(len(windows), cfg, per_window)
    val_plan = plan_rows(len(val_idx), cfg.seq_len, positions=cfg.positions, tokens=min(cfg.val_tokens, len(val_idx) * per_window),
                         seed=cfg.seed + 1)
    train_plan = plan_rows(len(train_idx), cfg.seq_len, positions=cfg.positions, tokens=cfg.tokens, seed=cfg.seed,
                           sample=cfg.sample)
    train_split = Split(windows[train_idx], train_plan, cfg.batch_size)
    val_split = Split(windows[val_idx], val_plan, cfg.batch_size)

    # What the data and teacher resolved to: a checkpoint of other rows or another model is refused.
    steps = int(cfg.steps) if cfg.steps else train_split.n_batches
    derived = _heads_derived(teacher, labels, steps, train_split, val_split)
    run.check_derived(derived)

    # Can the teacher serve the objective? kl distils head(features), which must be the model's own
    # distribution; checked on a prefix of the first validation windows.
    linear, lin_err = None, None
    if cache_path is not None:
        attrs = cache_attrs(cfg, teacher, corpus_label)

        def make_cache():  # rank 0 checks or writes the cache; the others wait for it
            if cache_path.is_file():
                check_cache(cache_path, attrs)
                return
            with torch.inference_mode():
                lin, err = check_linear_head(teacher, val_split.batch(0).input_ids.to(device))
            attrs["linear_head"] = int(lin)
            attrs["linear_head_rel_err"] = err
            try:
                write_cache(cache_path, attrs, FeatureSource(train_split, teacher), FeatureSource(val_split, teacher),
                            cfg.quiet or not world.main)
            except OSError as e:  # a full disk: no cache file is left (atomic write)
                raise UserError(f"could not write the feature cache {cache_path}: {os_error_text(e)}; free space or "
                                f"choose another --cache-features path.") from e

        distributed.on_main(world, make_cache)

        fh = h5py.File(cache_path, "r")
        linear, lin_err = bool(fh.attrs.get("linear_head", 1)), float(fh.attrs.get("linear_head_rel_err", 0.0))
        train_src = FeatureSource(train_split, cache=(fh["train_features"], fh["train_targets"],
                                                fh["train_offsets"][...], device), world=world)
        val_src = FeatureSource(val_split, cache=(fh["val_features"], fh["val_targets"], fh["val_offsets"][...], device),
                          world=world)
    else:
        fh = None
        with torch.inference_mode():
            linear, lin_err = check_linear_head(teacher, val_split.batch(0).input_ids.to(device))
        train_src, val_src = FeatureSource(train_split, teacher, world=world), FeatureSource(val_split, teacher, world=world)
    if not linear:
        if cfg.objective == "kl":
            raise UserError(f"--objective kl distils the teacher's head applied to its features, but this "
                            f"teacher's logits differ from that (relative error {lin_err:.1e}: soft-capping or "
                            f"logit scaling?); use --objective ce.")
        warnings.warn(f"the teacher's logits are not its head applied to its features (relative error "
                      f"{lin_err:.1e}); the reference row and the truncations use the head", stacklevel=2)

    try:
        result = _fit(cfg, teacher, weight, bias, ranks, labels, train_src, val_src, head_dtype, device, world,
                      run)
    finally:
        if fh is not None:
            fh.close()
    if not world.main:
        return None
    result.meta.update({
        "teacher": teacher.name, "teacher_source": teacher.source, "revision": cfg.revision, "corpus": corpus_label,
        "hidden_size": d, "n_cols": n_cols, "logit_width": teacher.logit_width, "init": cfg.init,
        "objective": cfg.objective, "seed": cfg.seed, "linear_head_check_rel_err": lin_err,
        "features": "cache:" + str(cache_path) if cache_path else "on the fly",
        "dtype": str(teacher.dtype).replace("torch.", ""), "device": str(device),
        "device_map": teacher.provenance()["device_map"],
        "seconds_total": time.perf_counter() - t0, "world_size": world.size,
    })
    def write(out):
        prov = {**provenance(device), "started": started, "finished": now_iso()}
        result.meta["config"] = {**result_config(cfg), "teacher": teacher.name, "corpus": corpus_label,
                                 "ranks": ",".join(labels)}
        result.meta["provenance"] = prov
        write_heads_run(out, result)

    run.finish(write)
    if run.out is not None:
        result.meta["out"] = str(run.out)
    return result


# ---- checkpoints of a sweep -------------------------------------------------------------------------
#: Options that do not change the result (where and how the run executes): a sweep may resume
#: with other values of these.


def _heads_run_config(cfg: HeadsConfig) -> dict:
    """The options a checkpoint must share with the sweep that resumes it (JSON-able)."""
    out = run_config(cfg)
    if not isinstance(out.get("ranks"), str):
        out["ranks"] = ",".join(map(str, out["ranks"]))
    return out


def _heads_derived(teacher, labels, steps: int, train: Split, val: Split) -> dict:
    """What the teacher and data resolved to, with a sha256 of both splits' rows."""
    return {"n_cols": teacher.n_cols, "hidden_size": teacher.hidden_size,
            "teacher_dtype": str(teacher.dtype).replace("torch.", ""), "ranks": ",".join(labels), "steps": steps,
            "train_rows_sha256": rows_fingerprint(train.windows, train.plan),
            "val_rows_sha256": rows_fingerprint(val.windows, val.plan)}


def _feature_gram(train_src: FeatureSource, gram_rows: int, d: int, device, world) -> tuple[torch.Tensor, int]:
    """fp64 HᵀH of the first training batches holding ≥ ``gram_rows`` rows (summed over the
    processes' shards); the batches stay in the source's memo for training."""
    n_train = int(train_src.offsets[-1])
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    n_gram, k = 0, 0
    while n_gram < min(gram_rows, n_train) and k < train_src.n_batches:
        h, _ = train_src.batch(k, keep=True)
        hd = h.double()
        gram += hd.T @ hd
        n_gram += train_src.rows(k)
        k += 1
    distributed.all_sum_(world, [gram])
    return gram, n_gram


def _fit(cfg: HeadsConfig, teacher, weight, bias, ranks, labels, train_src: FeatureSource, val_src: FeatureSource,
         head_dtype, device, world, run: Run) -> HeadsResult:


    d = weight.shape[1]
    families = families_of(cfg.family)
    n_train = int(train_src.offsets[-1])
    n_val = int(val_src.offsets[-1])
    steps = int(cfg.steps) if cfg.steps else train_src.n_batches
    teacher_kw = ({"teacher_weight": weight.to(head_dtype), "teacher_bias": None if bias is None else bias.to(head_dtype)}
                  if cfg.objective == "kl" else {})

    # Validation features once (the split is small and every head is evaluated on it); this
    # process's shard of them under torchrun.
    if n_val < MIN_VAL_ROWS:
        raise UserError(f"the validation split holds {n_val} rows, fewer than the {MIN_VAL_ROWS} needed "
                        f"to measure loss and accuracy; raise --val-tokens or use a bigger corpus.")
    rank_h = global_rows(val_src, int(cfg.rank_rows), world) if families else None
    val_h, val_t = val_src.all_rows()

    # The feature metric: fp64 Gram of the first training rows (kept for training, not recomputed).
    gram_rows = int(cfg.gram_rows) if cfg.gram_rows else max(4096, 4 * d)
    gram, n_gram = _feature_gram(train_src, gram_rows, d, device, world)
    if n_gram < d:
        warnings.warn(f"the feature metric comes from {n_gram} training rows, fewer than d = {d}: truncations past "
                      f"rank {n_gram} follow the head's own metric; raise --tokens for a full-rank metric",
                      stacklevel=2)
    t_trunc = time.perf_counter()
    # The mean second moment G/n, not the sum: the minimiser is the same, and the balanced factors
    # then have the scale of the logits whatever the number of rows (it matters to AdamW's steps).
    gram_w = head_moments(weight)
    feat_f, w_err_feat = feature_truncations(weight, gram / max(1, n_gram), ranks, gram_w=gram_w)
    weight_f, w_err_weight = weight_truncations(weight, ranks, gram_w=gram_w)

    def cast(a, b, bi=None):
        return (a.to(device, head_dtype), None if b is None else b.to(device, head_dtype),
                None if bi is None else bi.to(head_dtype))

    # The reference and both truncations at every rank: one evaluation, one all-reduce.
    evs = evaluate_heads([cast(weight, None, bias)] + [cast(*weight_f[r], bias) for r in ranks]
                         + [cast(*feat_f[r], bias) for r in ranks], val_h, val_t, world=world, n_rows=n_val,
                         **teacher_kw)
    reference, trunc_w, trunc_f = evs[0], evs[1:1 + len(ranks)], evs[1 + len(ranks):]
    reference["perplexity"] = math.exp(reference["loss"])
    t_trunc = time.perf_counter() - t_trunc

    # Peak LR per head: --lr, the paper's table, or a short search on a held-out training slice
    # (a resumed sweep takes the LRs its checkpoint was trained with).
    lrs = [float(cfg.lr) if cfg.lr else paper_lr(r) for r in ranks]
    search = None
    if run.position is not None:
        lrs, search = [float(x) for x in run.position["lrs"]], run.position.get("lr_search")
    elif cfg.lr_search:
        lrs, search = _lr_search(cfg, ranks, labels, train_src, d, weight.shape[0], feat_f, bias, head_dtype,
                                 device, teacher_kw, world)
    specs = [HeadSpec(r, lr, lab) for r, lr, lab in zip(ranks, lrs, labels)]
    sweep = HeadSweep(specs, n_cols=weight.shape[0], d=d, init=cfg.init, seed=cfg.seed, steps=steps, device=device,
                      dtype=head_dtype, svd_factors=feat_f, bias=bias, objective=cfg.objective,
                      weight_decay=cfg.weight_decay, world=world)
    fam = None
    if families:
        fam = FamilySweep(family_specs(families, ranks, labels, lrs, seeds=int(cfg.seeds), match_params=cfg.match_params,
                                       d=d, n_cols=weight.shape[0], bias=bias is not None),
                          d=d, n_cols=weight.shape[0], init=cfg.init, seed=cfg.seed, steps=steps, device=device,
                          dtype=head_dtype, svd_factors=feat_f, bias=bias, objective=cfg.objective,
                          weight_decay=cfg.weight_decay, world=world)
    del feat_f, weight_f
    # Every head's loss at its init (the svd init's is the feature-metric truncation's): training
    # that raises a head above it is reported, never silent.
    init_evals = trunc_f if cfg.init == "svd" else sweep.evaluate(val_h, val_t, n_rows=n_val, **teacher_kw)
    fam_init = fam.evaluate(val_h, val_t, n_rows=n_val, **teacher_kw) if fam else None
    _warn_short(steps, cfg)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = np.zeros((steps, len(specs)))
    fam_history = np.zeros((steps, len(fam.heads) if fam else 0))
    s0 = 0 if run.position is None else int(run.position["step"])
    if run.position is not None:  # collective: rank 0 checks, every process raises
        distributed.on_main(world, lambda: _check_position(run, s0, steps, len(specs)))
    if s0 > 0:
        _restore(run, sweep, history, fam, fam_history)
        for k in [k for k in train_src.memo if s0 >= train_src.n_batches or k < s0]:
            del train_src.memo[k]  # kept by the Gram for steps already taken
    t_heads = 0.0
    n_heads = len(specs) + (len(fam.heads) if fam else 0)
    bar = tqdm(total=steps, initial=s0, unit="step", desc=f"heads ×{n_heads}", disable=cfg.quiet or not world.main,
               dynamic_ncols=True)

    def save(done: int) -> None:  # every process holds the same heads after each all-reduced step
        states = {"sweep": sweep.state(), "history": {"train_loss": history[:done]}}
        if fam:
            states["families"] = fam.state()
            states["family_history"] = {"train_loss": fam_history[:done]}
        run.save(states=states, device=device, position={"step": done, "steps": steps, "lrs": lrs, "lr_search": search})

    # SIGINT/SIGTERM: checkpoint at the end of the current step, then stop (only with a run folder).
    try:
        for s in run.units(s0, steps, save=save, stopped=lambda done: f"stopped after step {done} of {steps}"):
            k = s % train_src.n_batches
            h, t = train_src.batch(k)
            t1 = time.perf_counter()
            history[s] = sweep.step(h, t, n_rows=train_src.rows(k), **teacher_kw)
            if fam:
                fam_history[s] = fam.step(h, t, n_rows=train_src.rows(k), **teacher_kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_heads += time.perf_counter() - t1
            bar.update(1)
            bar.set_postfix(loss=f"{history[s].mean():.3f}")
    finally:
        bar.close()
    train_src.memo.clear()
    evals = sweep.evaluate(val_h, val_t, n_rows=n_val, **teacher_kw)
    epochs = steps / max(1, train_src.n_batches)
    warned = _warn_worse(labels, evals, init_evals, epochs)
    table = None
    if fam:
        fam_evals = fam.evaluate(val_h, val_t, n_rows=n_val, **teacher_kw)
        fam_labels = [f"{sp.family.label} {sp.label} seed {sp.replicate}" for sp in fam.specs]
        warned += _warn_worse(fam_labels, fam_evals, fam_init, epochs)
        if world.main:  # the output ranks: rank 0 alone, on the gathered rows
            wt, bt = weight.to(head_dtype), None if bias is None else bias.to(head_dtype)
            spectra, teacher_spec = output_spectra(
                fam, rank_h, weight.shape[0], lambda x: torch.log_softmax(_logits(x, wt, None, bt), -1))
            table = family_table(fam.specs, fam.n_params(), fam_evals, fam_init, reference, spectra, teacher_spec,
                                 knee_threshold=float(cfg.knee_threshold), seed=cfg.seed)
            table["w_error"] = _pad_curves([sp.w_error() for sp in spectra])
            table["train_loss"] = fam_history

    mem = {"head_state_bytes": sweep.state_bytes() + (fam.state_bytes() if fam else 0),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        mem["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    n_steps_here = max(1, steps - s0)
    res = HeadsResult(
        ranks=list(ranks), labels=list(labels), lr=lrs,
        val_loss=[e["loss"] for e in evals], val_accuracy=[e["accuracy"] for e in evals],
        val_perplexity=[math.exp(min(e["loss"], 700.0)) for e in evals], reference=reference,
        truncation_loss=[e["loss"] for e in trunc_w], truncation_accuracy=[e["accuracy"] for e in trunc_w],
        head_w_error_weight=[float(w_err_weight[r - 1]) for r in ranks],
        truncation_loss_feature=[e["loss"] for e in trunc_f],
        truncation_accuracy_feature=[e["accuracy"] for e in trunc_f],
        head_w_error_feature=[float(w_err_feat[r - 1]) for r in ranks],
        w_error_weight_curve=w_err_weight, w_error_feature_curve=w_err_feat, train_loss=history,
        val_kl=[e["kl"] for e in evals] if cfg.objective == "kl" else None, lr_search=search,
        init_loss=[e["loss"] for e in init_evals], families=table,
        meta={"steps": steps, "n_train_rows": n_train, "n_val_rows": n_val, "gram_rows": n_gram,
              "rows_per_step": n_train / max(1, train_src.n_batches), "batch_size": cfg.batch_size,
              "epochs": steps / max(1, train_src.n_batches),
              "seconds_features": train_src.seconds + val_src.seconds, "seconds_heads": t_heads,
              "seconds_per_step": (train_src.seconds + t_heads) / n_steps_here,
              "seconds_heads_per_step": t_heads / n_steps_here, "seconds_truncation": t_trunc,
              "resumed_at_step": s0, "warnings": warned, **mem})
    return res


def _lr_search(cfg, ranks, labels, train_src: FeatureSource, d, n_cols, feat_f, bias, head_dtype, device, teacher_kw,
               world=None):
    """Try LR_SEARCH_FACTORS × the paper's LR for every rank, all heads in one sweep, for a tenth
    of the run's steps on the first training batches; score each on the next batches (never
    trained on during the search, never the validation split). Returns (lrs, table). Under
    torchrun the search is sharded like the training (global means, all-reduced gradients)."""
    n_b = train_src.n_batches
    if n_b < 2:
        raise UserError("--lr-search needs at least 2 training batches (one to train, one held out); "
                        "raise --tokens or lower --batch-size.")
    steps = int(cfg.steps) if cfg.steps else n_b
    held = max(1, n_b // 5)
    search_steps = max(1, min(math.ceil(steps / 10), n_b - held))
    specs = [HeadSpec(r, paper_lr(r) * f, lab) for r, lab in zip(ranks, labels) for f in LR_SEARCH_FACTORS]
    sweep = HeadSweep(specs, n_cols=n_cols, d=d, init=cfg.init, seed=cfg.seed, steps=search_steps, device=device,
                      dtype=head_dtype, svd_factors=feat_f, bias=bias, objective=cfg.objective,
                      weight_decay=cfg.weight_decay, world=world)
    for s in range(search_steps):
        h, t = train_src.batch(s, keep=True)
        sweep.step(h, t, n_rows=train_src.rows(s), **teacher_kw)
    parts = [train_src.batch(k) for k in range(n_b - held, n_b)]
    hh, tt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n_held = sum(train_src.rows(k) for k in range(n_b - held, n_b))
    scores = sweep.evaluate(hh, tt, n_rows=n_held, **teacher_kw)
    key = "kl" if cfg.objective == "kl" else "loss"  # scored by the objective being trained
    table, lrs = {}, []
    for i, lab in enumerate(labels):
        block = specs[i * len(LR_SEARCH_FACTORS):(i + 1) * len(LR_SEARCH_FACTORS)]
        losses = scores[i * len(LR_SEARCH_FACTORS):(i + 1) * len(LR_SEARCH_FACTORS)]
        best = min(range(len(block)), key=lambda j: (not math.isfinite(losses[j][key]), losses[j][key]))
        lrs.append(block[best].lr)
        table[lab] = {f"{sp.lr:.3g}": e[key] for sp, e in zip(block, losses)}
    table["search_steps"] = search_steps
    table["held_out_rows"] = int(n_held)
    return lrs, table


def _check_position(run: Run, step: int, steps: int, n_heads: int) -> None:
    """Rank 0: the checkpoint's step lies within this schedule and its loss history holds one
    row of ``n_heads`` losses per step taken, or it is refused."""
    ck = run.checkpoint
    loss = np.asarray(ck.states.get("history", {}).get("train_loss", np.zeros((0, 0))))
    if not (0 <= step <= steps and int(ck.position.get("steps", steps)) == steps
            and loss.shape == (step, n_heads)):
        raise UserError(f"the checkpoint {ck.path} is inconsistent (step {step} of {ck.position.get('steps')}, a "
                        f"{loss.shape} loss history, for {steps} steps of {n_heads} heads); delete it (or pass "
                        f"--overwrite instead of --resume) to start afresh.")


def _restore(run: Run, sweep: HeadSweep, history: np.ndarray, fam: Optional[FamilySweep] = None,
             fam_history: Optional[np.ndarray] = None) -> None:
    """Load the checkpoint's heads, AdamW states and loss history on every process."""
    names = ["sweep", "history"] + (["families", "family_history"] if fam else [])
    states = run.saved_states(names)
    pairs = [(sweep, "sweep", history, "history")] + ([(fam, "families", fam_history, "family_history")] if fam else [])
    for heads, key, hist, hkey in pairs:
        try:
            heads.load_state(distributed.broadcast_arrays(run.world, None if states is None else states[key]))
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # heads of another shape or kind
            raise UserError(f"the checkpoint {run.out} holds heads this sweep cannot continue ({type(e).__name__}); "
                            f"delete it (or pass --overwrite instead of --resume) to start afresh.") from e
        done = distributed.broadcast(run.world, None if states is None else states[hkey]["train_loss"])
        hist[:len(done)] = done
    run.restore_rng(sweep.A[0].device)


#: Optimiser steps below which Pythia's schedule cannot play out: the warm-up is a single step
#: and AdamW's first steps, which move every weight by about the peak LR, dominate the run.
MIN_SCHEDULE_STEPS = 100


def _warn_short(steps: int, cfg: HeadsConfig) -> None:
    if steps < MIN_SCHEDULE_STEPS:
        lr = f"--lr {cfg.lr:g}" if cfg.lr else "the paper's peak LRs (2e-2 … 2e-3)"
        warnings.warn(f"{steps} optimiser steps are far too short for the schedule (1% warm-up, cosine decay) "
                      f"at {lr}: AdamW's first steps move every weight by about the LR and can undo the init; "
                      f"train ≥ {MIN_SCHEDULE_STEPS} steps (--steps, --tokens)"
                      + (" or lower --lr (e.g. 1e-4 with --init svd)" if not cfg.lr or cfg.lr > 1e-4 else ""),
                      stacklevel=3)


def _warn_worse(labels, evals, init_evals, epochs: float) -> list[str]:
    """Warn (and return the message) when training raised heads' validation loss above their init's."""
    worse = worse_than_init(labels, evals, init_evals)
    if not worse:
        return []
    msg = (f"training raised the validation loss above the init's for {len(worse)} head(s): {', '.join(worse[:8])}"
           f"{' …' if len(worse) > 8 else ''}; lower --lr, or train on more rows (--tokens: this run made "
           f"{epochs:.3g} passes over its training rows, a large head overfits them)")
    warnings.warn(msg, stacklevel=3)
    return [msg]


def _pad_curves(curves) -> np.ndarray:
    """W-error curves of different lengths as one (heads, k_max) array, NaN-padded."""
    k = max((len(c) for c in curves), default=0)
    out = np.full((len(curves), k), np.nan)
    for i, c in enumerate(curves):
        out[i, :len(c)] = c
    return out
