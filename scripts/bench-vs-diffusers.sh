#!/usr/bin/env bash
# sd-run against diffusers, side by side, on the same random-weight model with real SD 1.5
# dimensions: same prompt, seed, steps, size, scheduler (DDIM, CFG 7.5) and thread count.
#
#   scripts/bench-vs-diffusers.sh [--res 256|512] [--steps N] [--threads T] [--runs R]
#
# First run sets up (cached under .bench/, git-ignored): a Python venv with pinned torch,
# diffusers, transformers, safetensors and numpy from PyPI, and the model (seed 0, ~4.3 GB).
# SD_RUN_BENCH_BIN=path runs that sd-run build instead of building this checkout's
# (SD_RUN_BENCH_TAG names its results folder). The two programs alternate R times; the table
# shows medians per stage (seconds), the ratio sd-run/diffusers, both programs' peak RSS, and how far apart their images are. The last line
# is `ratio X.XX` for the whole image (text encode + all steps + VAE decode, model loaded; the
# diffusers side reads every weight during its load, as sd-run does, instead of paging them in
# lazily during the first steps).
set -euo pipefail

RES=256 STEPS=2 THREADS=2 RUNS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --res) RES="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$RES" in ''|*[!0-9]*) echo "--res: expected a number" >&2; exit 2 ;; esac
if [ $((RES % 8)) -ne 0 ]; then echo "--res must be a multiple of 8" >&2; exit 2; fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${SD_RUN_BENCH_DIR:-$ROOT/.bench}"
VENV="$BENCH/venv"
PY="$VENV/bin/python"
PINS="torch==2.15.0 diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0 safetensors==0.8.0 numpy==2.4.6"
MODEL="$BENCH/sd15-random"
mkdir -p "$BENCH"

# 1. The Python side, once.
if [ ! -x "$PY" ] || [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  echo "setting up $VENV ($PINS)" >&2
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet $PINS
  echo "$PINS" > "$VENV/.pins"
fi

# 2. The model, once (deterministic: seed 0).
if [ ! -f "$MODEL/model_index.json" ]; then
  echo "writing the SD 1.5-dimension random model to $MODEL" >&2
  "$PY" "$ROOT/scripts/bench/make_model.py" "$MODEL" "$ROOT/tests/fixtures/golden/models/tiny-sd15/tokenizer"
fi

# 3. sd-run's side (SD_RUN_BENCH_BIN: an already built bench_pipeline, e.g. an older version's).
if [ -n "${SD_RUN_BENCH_BIN:-}" ]; then
  SDRUN="$SD_RUN_BENCH_BIN"
else
  (cd "$ROOT" && cargo build --release --quiet --example bench_pipeline)
  SDRUN="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench_pipeline"
fi

# Both read the weights from the page cache, not the disk.
cat "$MODEL"/*/*.safetensors > /dev/null

OUT="$BENCH/results-${SD_RUN_BENCH_TAG:-current}-${RES}-s${STEPS}-t${THREADS}"
rm -rf "$OUT" && mkdir -p "$OUT"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

run_sdrun() {
  /usr/bin/time -f '%M' -o "$OUT/sdrun.rss.$1" "$SDRUN" "$MODEL" --width "$RES" --height "$RES" --steps "$STEPS" \
    --image-out "$OUT/sdrun.f32" >> "$OUT/sdrun.jsonl"
}
run_diffusers() {
  /usr/bin/time -f '%M' -o "$OUT/diffusers.rss.$1" "$PY" "$ROOT/scripts/bench/diffusers_run.py" "$MODEL" "$RES" "$RES" "$STEPS" "$THREADS" \
    "$OUT/diffusers.f32" 2>"$OUT/diffusers.stderr.$1" >> "$OUT/diffusers.jsonl"
}

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for i in $(seq 1 "$RUNS"); do
  echo "run $i/$RUNS (${RES}x${RES}, $STEPS steps, $THREADS threads)" >&2
  if [ $((i % 2)) -eq 1 ]; then run_sdrun "$i"; run_diffusers "$i"; else run_diffusers "$i"; run_sdrun "$i"; fi
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$PY" "$ROOT/scripts/bench/summarize.py" "$OUT" "$RES" "$STEPS" "$THREADS"
