#!/usr/bin/env bash
# One GPU check of twist_jax in at most ~8 minutes (bench/gpu_check.py says what it measures).
#   bash bench/gpu_check.sh          # on a fresh GPU box, from the repo root: installs what the
#                                    # image lacks from .whl/ (carried: /work/shared/gpu/
#                                    # fetch-wheels.sh), then writes $OUT/gpu_check.json, or
#                                    # results/bench/gpu/gpu_check.json when OUT is unset
#   bash bench/gpu_check.sh --dry    # tiny shapes on CPU: the same JSON structure, no installs
# Any other argument is passed to bench/gpu_check.py (e.g. --budget-s 300).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
t0=$(date +%s)
if [[ " $* " != *" --dry "* ]]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    # No deps, no index: exactly the carried wheels, beside the image's own packages.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: no .whl/*.whl here; assuming the image has ml_collections" >&2
  fi
fi
# Persistent compilation cache: the memory analysis of a compiled round reuses the compile of its
# timed run, and a rerun on the same box skips most compiles.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
# twist_jax itself from this checkout, without installing it or its dependencies.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import ml_collections, twist_jax.config'  # fail fast, before any timing
budget=$(( 460 - ($(date +%s) - t0) ))  # 8 minutes in all, less what installing took
exec python3 bench/gpu_check.py --budget-s "$budget" "$@"
