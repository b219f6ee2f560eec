#!/usr/bin/env bash
# One run of each command and its PNGs, to look at by eye (the figures of a report):
#
#   bash benchmarks/make_figures.sh [OUT]              # tiny random GPT-NeoX: ~1 min on 2 cores
#   FULL=1 bash benchmarks/make_figures.sh [OUT]       # + the embedded SmolLM2 teacher (~2 min more)
#
# OUT (default /tmp/rankest-figures) receives one folder per run:
#   tiny/                 the tiny random GPT-NeoX teacher (d = 32, V' = 320, seed 0)
#   estimate/             estimate --diagnostics: spectrum, w_error, convergence, anisotropy, head_spectrum PNGs
#   sketch/               estimate --space prob --route sketch --rank-max 64: a sketch's curve and marks
#   ngram/                estimate --teacher ngram:3 --corpus-fractions: + corpus_fractions.png
#   anisotropy/           anisotropy: anisotropy.png
#   head-spectrum/        head-spectrum of one model: head_spectrum.png (σ_i/σ_0 and the head's W-error)
#   ckpts/step1, step2    two "checkpoints" (tiny models of other seeds and init scales) for the sweeps
#   head-spectrum-sweep/  head-spectrum of the two checkpoints: heat map + singular entropy
#   anisotropy-sweep/     anisotropy of the two checkpoints: one line per checkpoint
#   heads/                heads --init svd: heads_loss_vs_rank.png, heads_loss_vs_w_error.png
#   compare/              report estimate sketch ngram --out compare: compare_w_error.png
#   default/              (FULL=1) estimate --diagnostics on the embedded teacher (the README's first command)
#   index.md              the machine, the commands run and every PNG, to open in a Markdown viewer
# and every folder is re-rendered once more by `rankest report FOLDER` (the report command on each kind).
# Knobs: PY (python), RANKEST_ROOT (the checkout; default this script's parent).
set -euo pipefail
ROOT=${RANKEST_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
PY=${PY:-python}
OUT=${1:-/tmp/rankest-figures}
mkdir -p "$OUT"
LOG="$OUT/commands.txt"
: > "$LOG"
STAMP="$OUT/.started"
touch "$STAMP"
R() { echo "+ rankest $*" | tee -a "$LOG" >&2; "$PY" -m rankest "$@"; }

"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from rankest.sources.teachers import build_tiny_neox
out = Path(sys.argv[1])
# the teacher, and two "checkpoints" of another tiny model (other seeds and init scales)
for name, seed, std in (("tiny", 0, 0.1), ("ckpts/step1", 1, 0.05), ("ckpts/step2", 2, 0.3)):
    if not (out / name / "config.json").is_file():
        build_tiny_neox(save_dir=out / name, seed=seed, init_std=std)
PYEOF
T="$OUT/tiny"
R estimate --teacher "$T" --tokens 2048 --diagnostics --quiet --overwrite --out "$OUT/estimate"
R estimate --teacher "$T" --tokens 2048 --space prob --route sketch --rank-max 64 --quiet --overwrite --out "$OUT/sketch"
R estimate --teacher ngram:3 --tokenizer "$T" --space prob --corpus-fractions 0.25,0.5,1 --quiet --overwrite \
  --out "$OUT/ngram"
R anisotropy --teacher "$T" --tokens 1024 --quiet --overwrite --out "$OUT/anisotropy"
R head-spectrum --teacher "$T" --quiet --overwrite --out "$OUT/head-spectrum"
R head-spectrum --teacher "$OUT/ckpts" --revisions step1,step2 --quiet --overwrite --out "$OUT/head-spectrum-sweep"
R anisotropy --teacher "$OUT/ckpts" --revisions step1,step2 --tokens 1024 --quiet --overwrite --out "$OUT/anisotropy-sweep"
R heads --teacher "$T" --tokens 2048 --ranks 4,8,16,full --init svd --steps 50 --quiet --overwrite --out "$OUT/heads"
R report "$OUT/estimate" "$OUT/sketch" "$OUT/ngram" --out "$OUT/compare"
if [[ -n "${FULL:-}" ]]; then
  R estimate --diagnostics --quiet --overwrite --out "$OUT/default"
fi
for d in estimate sketch ngram anisotropy anisotropy-sweep head-spectrum head-spectrum-sweep heads ${FULL:+default}; do
  R report "$OUT/$d"
done
{
  echo "# rankest figures ($(date -u +%F' '%H:%M' UTC'), $(uname -n): $(getconf _NPROCESSORS_ONLN) CPU cores, $("$PY" -c 'import torch; print("torch", torch.__version__)'))"
  echo
  echo "Made by \`bash benchmarks/make_figures.sh $OUT\`${FULL:+ with FULL=1}. Commands:"
  echo
  echo '```'
  cat "$LOG"
  echo '```'
  for png in $(cd "$OUT" && find . -name '*.png' -newer "$STAMP" | sort); do
    printf '\n## %s\n\n![%s](%s)\n' "${png#./}" "${png#./}" "${png#./}"
  done
} > "$OUT/index.md"
echo "wrote $OUT/index.md" >&2
