#!/usr/bin/env bash
# The CPU smoke pipeline of the README's quickstart: train SiT-T/2 + SARA for 20 steps on synthetic
# data, sample a grid and two sets of 128 images, and evaluate one set against the other with fid.py.
# Every pretrained part is a random stand-in, so the numbers only show that the pipeline runs.
# Extra fid.py flags (e.g. --weights PATH for an offline Inception file) go in FID_ARGS.
set -euo pipefail
cd "$(dirname "$0")"
out=${OUT:-runs}
run=$out/smoke-sara-SiT-T2

python train.py --preset smoke --align sara --out "$out"
ckpt=$(ls "$run"/checkpoints/*.pt | tail -n 1)
sample=(python sample.py --ckpt "$ckpt" --vae tiny-random --num-steps 20 --batch-size 64)
"${sample[@]}" --out "$run/grid.png"
"${sample[@]}" --num-samples 128 --seed 1 --out "$run/eval/reference.npz"
"${sample[@]}" --num-samples 128 --seed 2 --out "$run/eval/samples.npz"
# shellcheck disable=SC2086  # FID_ARGS is a list of flags
python fid.py --write-ref "$run/eval/reference-batch.npz" "$run/eval/reference.npz" --ref-images 128 --min-images 64 ${FID_ARGS:-}
# shellcheck disable=SC2086
python fid.py "$run/eval/reference-batch.npz" "$run/eval/samples.npz" --min-images 64 --is-split 64 ${FID_ARGS:-}
echo "smoke pipeline done: $run"
