#!/usr/bin/env bash
# GPU benchmark for docs/benchmarks.md: one prepared script for a lent GPU machine (see ../shared/gpu/README.md).
#
# What it runs (eager, fp16, 50 steps, full-size models with random weights, text encoding excluded):
#   1. docs-table : SD2.1, DDIM, 512/768/1024 x batch 8/4/1, original vs DeepCache (3,0) (5,0) (5,1)
#   2. sd15-512   : SD1.5 512x512, batch 1, same variants, DDIM
#   3. sdxl-1024  : SDXL 1024x1024, batch 1, same variants, DDIM
# Compiled stages (not in the default STAGES; issue 5 targets; run them with
# STAGES="sd21-512-compiled sdxl-1024-compiled"): eager and torch.compile(mode="reduce-overhead", fullgraph=True)
# baseline and DeepCache (3,0), batch 1, DDIM, 50 steps; compile + warm-up time reported separately.
#   4. sd21-512-compiled  : SD2.1 512x512   (~3 min on an H200: 70 s compile per graph kind)
#   5. sdxl-1024-compiled : SDXL 1024x1024 (~5 min on an H200: ~2 min compile per graph kind)
# Each stage prints one JSON line per finished scenario (so a time-out still returns what finished) and
# writes $OUT/<stage>.json, <stage>.md, <stage>.log (stdout) and <stage>.err (stderr); at the end
# $OUT/benchmarks.md holds all tables, and $OUT/gpu_bench.tgz holds every file under $OUT (also written when
# the script is interrupted or killed by a time-out's TERM: the device tool returns only 8 files, and this is
# one of them). Expected device time on an H200 with REPEATS=3: ~6-7 minutes
# (docs-table ~5 min); REPEATS=2 cuts it to ~4.5 minutes.
#
# On the GPU machine (project root; first run ../shared/gpu/wheels.sh here, then the device tool with
# carry [".whl"] and timeout_s 600):
#     bash tools/gpu_bench.sh
# CPU smoke test of the whole script (tiny models, seconds):
#     OUT=/tmp/gpu_bench_cpu bash tools/gpu_bench.sh --tiny --device cpu --dtype float32 --threads 1 --steps 3 --repeats 1 --warmup-steps 1
# Extra arguments are appended to every `python -m DeepCache.tools.bench` call (scalar options override).
# Environment: OUT (default ./out/gpu_bench), REPEATS (default 3), STAGES (default "docs-table sd15-512 sdxl-1024"),
# COMPILE_MODE (compiled stages; default reduce-overhead).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/out/gpu_bench}
REPEATS=${REPEATS:-3}
STAGES=${STAGES:-"docs-table sd15-512 sdxl-1024"}
mkdir -p "$OUT"

# Everything under $OUT in one archive, whenever the script ends (normally, on error, Ctrl-C or TERM).
pack() {
  [ "$BASHPID" = "$$" ] || return 0  # the main script only, not a subshell it forked
  local tmp
  tmp=$(mktemp "${TMPDIR:-/tmp}/gpu_bench.XXXXXX") || return 1
  # built outside $OUT (a file growing inside the folder it archives makes tar fail); status 1 = a file
  # changed while read (a log still being flushed), still a good archive
  tar -czf "$tmp" -C "$OUT" --exclude ./gpu_bench.tgz .
  if [ $? -le 1 ]; then mv -f "$tmp" "$OUT/gpu_bench.tgz"; else rm -f "$tmp"; fi
}
trap pack EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. Wheels the machine lacks (diffusers, importlib_metadata), carried in ./.whl.
if compgen -G ".whl/*.whl" > /dev/null && ! python3 -c "import diffusers" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
fi
if [ -d .site ]; then
  export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

# 2. Environment line (also checks the imports before spending time).
python3 - <<'PY' | tee "$OUT/env.json" || exit 1
import json, torch, diffusers, DeepCache
print(json.dumps({"stage": "env", "torch": torch.__version__, "diffusers": diffusers.__version__,
                  "deepcache": DeepCache.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY

# 3. The stages.
bench() {  # bench NAME ARGS...
  local name=$1
  shift
  echo "{\"stage\": \"$name\", \"event\": \"start\", \"utc\": \"$(date -u +%FT%TZ)\"}"
  python3 -m DeepCache.tools.bench "$@" --repeats "$REPEATS" --jsonl --no-progress \
    --out "$OUT/$name.json" --markdown "$OUT/$name.md" "${EXTRA[@]}" 2> "$OUT/$name.err" | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "{\"stage\": \"$name\", \"event\": \"end\", \"rc\": $rc, \"utc\": \"$(date -u +%FT%TZ)\"}"
  [ "$rc" -eq 0 ] || tail -n 20 "$OUT/$name.err"
  return "$rc"
}
EXTRA=("$@")
VARIANTS=(--variant 3,0 --variant 5,0 --variant 5,1)
status=0
for stage in $STAGES; do
  case $stage in
    docs-table) bench docs-table --preset docs-table --dtype float16 || status=1 ;;
    sd15-512) bench sd15-512 --model sd15 --resolution 512 --batch-size 1 "${VARIANTS[@]}" --steps 50 \
                --scheduler ddim --dtype float16 || status=1 ;;
    sdxl-1024) bench sdxl-1024 --model sdxl --resolution 1024 --batch-size 1 "${VARIANTS[@]}" --steps 50 \
                 --scheduler ddim --dtype float16 || status=1 ;;
    sd21-512-compiled) bench sd21-512-compiled --model sd21 --resolution 512 --batch-size 1 --variant 3,0 --steps 50 \
                         --scheduler ddim --dtype float16 --compile "${COMPILE_MODE:-reduce-overhead}" || status=1 ;;
    sdxl-1024-compiled) bench sdxl-1024-compiled --model sdxl --resolution 1024 --batch-size 1 --variant 3,0 --steps 50 \
                          --scheduler ddim --dtype float16 --compile "${COMPILE_MODE:-reduce-overhead}" || status=1 ;;
    *) echo "unknown stage $stage" >&2; status=1 ;;
  esac
done

# 4. All tables in one file.
{
  echo "<!-- tools/gpu_bench.sh, $(date -u +%FT%TZ) -->"
  for stage in $STAGES; do
    [ -f "$OUT/$stage.md" ] || continue
    echo
    echo "### $stage"
    echo
    cat "$OUT/$stage.md"
  done
} > "$OUT/benchmarks.md"
echo "{\"stage\": \"done\", \"status\": $status, \"out\": \"$OUT\"}"
exit "$status"
