"""`saturation` on a realistic input built here: a SYNTHETIC Pythia suite of lm-evaluation-harness files.

    python benchmarks/saturation_example.py                  # writes the files, runs the command, ~10 s

The suite is not real data: no Pythia evaluation was downloaded or run. It is built to look
like the one the Pythia repository publishes, with the paper's shape (Godey et al. 2024, §3,
Fig. 1):

* ten sizes, pythia-14m … pythia-12b, with their real parameter counts (from their configs);
* lambada_openai perplexity and accuracy at the Pythia checkpoints step0, 1, 2, 4, …, 512,
  1000, 2000, 4000, 8000, 13000, 23000, 33000, …, 143000;
* the final checkpoints of the models ≥ 1B lie on a planted law ppl(N) = 2 + 21,893·N^(−0.4)
  (total parameters); the models ≤ 410M reach their best checkpoint 2–6% above the law (mean 4%)
  at steps 13000–63000 and then get worse, ending 5–12% above it (mean 8.2%): the paper's ≈ 4% /
  ≈ 8%;
* every value carries Gaussian noise of its stated standard error (0.3% of the perplexity, about
  the error of an average over many tasks; the binomial error of 5,153 lambada examples for the
  accuracy, which is derived from the perplexity);
* the models ≤ 410M are written in the harness's older layout (`pythia-v1/pythia-160m/zero-shot/
  160m_step1000.json`, `"config": {"model_args": "pretrained=EleutherAI/pythia-v1.1-160m,
  revision=step1000"}`, metric keys `ppl`, `acc`), the models ≥ 1B in the current one
  (`current/pythia-1b_step1000.json`, `configs`, `n-shot`, keys `perplexity,none`,
  `acc_stderr,none`), half of them with `model_args` as a dict, half named by file name only.

Then it runs ``python -m rankest saturation`` on the folder and copies saturation.md, its PNGs
and saturation.json to benchmarks/reports/saturation_example*.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPORTS = HERE / "reports"
sys.path.insert(0, str(HERE.parent))

from rankest.saturation.params import param_counts  # noqa: E402

SIZES = ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
#: (best, final) relative distance above the law of the small models, and the step of their best.
SMALL = {"14m": (0.06, 0.12, 13000), "31m": (0.05, 0.10, 23000), "70m": (0.04, 0.08, 33000),
         "160m": (0.03, 0.06, 43000), "410m": (0.02, 0.05, 63000)}
E, A, ALPHA = 2.0, 21893.0, 0.4
STEPS = [0] + [2 ** i for i in range(10)] + [1000, 2000, 4000, 8000] + list(range(13000, 143001, 10000))
REL_SE = 0.003
N_LAMBADA = 5153


def curve(size: str, n: float) -> np.ndarray:
    """Noise-free perplexity at STEPS: a fall (in log perplexity) from the vocabulary size to the best
    value at the best step, then, for the small models, a rise linear in log step to the final value."""
    law = E + A * n ** -ALPHA
    best_rel, final_rel, t_best = SMALL.get(size, (0.0, 0.0, 143000))
    best, final = law * (1 + best_rel), law * (1 + final_rel)
    t = np.asarray(STEPS, dtype=float)
    g = 1 / (1 + (t / 300) ** 1.2)  # 1 at step 0, → 0 late
    g_best = 1 / (1 + (t_best / 300) ** 1.2)
    fall = np.exp(np.log(best) + np.log(50277 / best) * (g - g_best) / (1 - g_best))
    span = max(math.log(143000 / t_best), 1e-12)
    rise = np.where(t > t_best, (final - best) * np.log(t.clip(1) / t_best) / span, 0.0)
    return np.where(t <= t_best, fall, best + rise)


def accuracy(ppl: np.ndarray) -> np.ndarray:
    return np.clip(1.05 - 0.23 * np.log(ppl), 0.0, 1.0)


def write_suite(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for k, size in enumerate(SIZES):
        name = f"pythia-{size}"
        n = param_counts(name)["total"]
        ppl = curve(size, n)
        ppl_se = REL_SE * ppl
        ppl_obs = ppl + ppl_se * rng.standard_normal(ppl.size)
        acc = accuracy(ppl_obs)
        acc_se = np.sqrt(acc * (1 - acc) / N_LAMBADA)
        acc_obs = np.clip(acc + acc_se * rng.standard_normal(acc.size), 0, 1)
        for i, step in enumerate(STEPS):
            if size in SMALL:  # the older layout, as the Pythia repository publishes it
                path = root / "pythia-v1" / name / "zero-shot" / f"{size}_step{step}.json"
                data = {"results": {"lambada_openai": {"ppl": ppl_obs[i], "ppl_stderr": ppl_se[i], "acc": acc_obs[i],
                                                       "acc_stderr": acc_se[i]}},
                        "versions": {"lambada_openai": 0},
                        "config": {"model": "hf-causal", "model_args": f"pretrained=EleutherAI/pythia-v1.1-{size},"
                                                                       f"revision=step{step}",
                                   "num_fewshot": 0, "batch_size": 16, "limit": None}}
            else:  # the current layout
                path = root / "current" / f"{name}_step{step}.json"
                args = ({"pretrained": f"EleutherAI/{name}", "revision": f"step{step}"} if k % 2 else "")
                data = {"results": {"lambada_openai": {"alias": "lambada_openai", "perplexity,none": ppl_obs[i],
                                                       "perplexity_stderr,none": ppl_se[i], "acc,none": acc_obs[i],
                                                       "acc_stderr,none": acc_se[i]}},
                        "configs": {"lambada_openai": {"task": "lambada_openai", "num_fewshot": 0}},
                        "versions": {"lambada_openai": 1.0}, "n-shot": {"lambada_openai": 0},
                        "config": {"model": "hf", "model_args": args, "batch_size": 16}}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))


NOTES = {
    "ppl": "The planted case: the law fitted on the models that do not saturate (found: the five ≥ 1B), the "
           "small models' distances from it against the planted 4% (best) and 8.2% (final).",
    "acc": "The accuracy derived from the same perplexities, with lambada's binomial errors (≈ 0.6 points): the "
           "late decline of the small models is mostly within 2 standard errors of their best, so fewer models "
           "are found saturating and the default fit takes them in — what the rule does with noisier metrics.",
    "ppl_nonemb": "The same files with N = non-embedding parameters: the law was planted in total parameters, so "
                  "this fit extrapolates differently to the small models (whose embeddings are most of their "
                  "parameters) — the choice of N changes the deviations, which is why both counts are reported.",
}


def main() -> None:
    REPORTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        suite, out = Path(tmp) / "suite", Path(tmp) / "out"
        write_suite(suite)
        n_files = sum(1 for _ in suite.rglob("*.json"))
        reports = []
        runs = (("lambada_openai:ppl", [], "ppl"), ("lambada_openai:acc", [], "acc"),
                ("lambada_openai:ppl", ["--param-count", "non_embedding"], "ppl_nonemb"))
        for metric, extra, tag in runs:
            cmd = [sys.executable, "-m", "rankest", "saturation", "--evals", str(suite), "--metric", metric,
                   "--out", str(out / tag), "--quiet", *extra]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
            secs = time.perf_counter() - t0
            if res.returncode:
                raise SystemExit(res.stderr)
            reports.append((metric, cmd, res.stdout, secs, out / tag, tag))
        lines = ["# saturation on a synthetic Pythia suite (SYNTHETIC INPUTS)", "",
                 "**The inputs are synthetic**: lm-evaluation-harness result files generated by "
                 "`benchmarks/saturation_example.py`, shaped like the Pythia suite's published evaluations and the "
                 "paper's Fig. 1 (planted law ppl(N) = 2 + 21,893·N^(−0.4) for the models ≥ 1B; the models ≤ 410M "
                 "best 4% and final 8.2% above it on average, getting worse after steps 13k–63k; 0.3% noise). "
                 "No Pythia model was evaluated. They test that the command finds what was planted.", "",
                 f"{n_files} files, {len(SIZES)} models × {len(STEPS)} checkpoints, both harness layouts. Machine: "
                 f"{platform.node()} ({platform.processor() or platform.machine()}), 2 CPU cores shared by 8 sessions.",
                 ""]
        for metric, cmd, stdout, secs, folder, tag in reports:
            stem = f"saturation_example_{tag}"
            for png in sorted(folder.glob("*.png")):
                shutil.copyfile(png, REPORTS / f"{stem}_{png.name}")
            shutil.copyfile(folder / "saturation.json", REPORTS / f"{stem}.json")
            md = (folder / "saturation.md").read_text()
            md = md.replace("](saturation_", f"]({stem}_saturation_").replace("# Saturation", "## Saturation")
            shown = " ".join(c if not c.startswith("/") else "SUITE" if c.endswith("suite") else "OUT"
                             for c in cmd[1:])
            lines += [f"## {metric}{' ' + ' '.join(cmd[cmd.index('--quiet') + 1:]) if tag == 'ppl_nonemb' else ''}",
                      "", NOTES[tag], "", "```", f"python {shown}   # {secs:.1f} s", stdout.strip(), "```", "", md]
        (REPORTS / "saturation_example.md").write_text("\n".join(lines))
        print(f"wrote {REPORTS / 'saturation_example.md'}")


if __name__ == "__main__":
    main()
