#!/usr/bin/env bash
# images/s of `deepcache generate` on the embedded demo model: one process vs two with the same total CPU threads,
# at batch 16 and batch 1, and (where a GPU is present) one GPU. The rate is what `generate` prints: new images
# divided by the seconds from the first batch to the last process's end (model loading excluded).
#
#     bash tools/generate_bench.sh            # 128 prompts, 25 DDIM steps, I=3/B=0
#     NUM_PROMPTS=64 STEPS=25 bash tools/generate_bench.sh
# Output: one line per run ("label: N new image(s) in S s, R images/s") and $OUT/generate_bench.txt (OUT default
# ./out/generate_bench). Two CPU processes are started with accelerate (`--multi_gpu` with no GPU visible: on a
# CPU-only machine `accelerate launch --cpu --num_processes 2` starts a single process).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-./out/generate_bench}
NUM_PROMPTS=${NUM_PROMPTS:-128}
STEPS=${STEPS:-25}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python -c "from DeepCache.tools.prompts import embedded_prompts; print('\n'.join(embedded_prompts($NUM_PROMPTS)))" > "$WORK/prompts.txt"
COMMON=(--prompts "$WORK/prompts.txt" --steps "$STEPS" --variant 3,0 --no-progress)
TWO_CPU=(accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no)

run() {  # label, then the command
    local label=$1; shift
    local line
    line=$("$@" 2>/dev/null | grep "new image" | sed 's/^deepcache generate: //')
    echo "$label: ${line:-FAILED}" | tee -a "$OUT/generate_bench.txt"
}

: > "$OUT/generate_bench.txt"
echo "# $(date -u +%FT%TZ) $NUM_PROMPTS prompts, $STEPS steps, I=3/B=0, embedded model; $(nproc) CPU cores" | tee -a "$OUT/generate_bench.txt"
for batch in 16 1; do
    run "batch $batch, 1 process x 2 threads" env CUDA_VISIBLE_DEVICES="" \
        python -m DeepCache generate "${COMMON[@]}" --out "$WORK/a$batch" --batch-size $batch --threads 2 --device cpu
    run "batch $batch, 2 processes x 1 thread" env CUDA_VISIBLE_DEVICES="" \
        "${TWO_CPU[@]}" -m DeepCache generate "${COMMON[@]}" --out "$WORK/b$batch" --batch-size $batch --threads 1 --device cpu
    cmp -s <(cat "$WORK"/a$batch/*.png) <(cat "$WORK"/b$batch/*.png) && same=yes || same=NO
    # (bytes are promised equal only for equal thread counts; 2 threads vs 1 may change the last bits)
    echo "batch $batch: 1 process x 2 threads and 2 x 1 give the same PNG bytes: $same" | tee -a "$OUT/generate_bench.txt"
    if command -v nvidia-smi >/dev/null && python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        run "batch $batch, 1 GPU" python -m DeepCache generate "${COMMON[@]}" --out "$WORK/g$batch" \
            --batch-size $batch --device cuda
    fi
done
