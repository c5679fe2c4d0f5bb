set -e
cd main && . .venv/bin/activate
export PYTHONPATH=frozen33/src:frozen33/benchmarks:frozen33/benchmarks/shortcut_suite OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
O=runs/suite_heldout31
RUNS="$O/heldout30_fixed_patch/bundled/s101 $O/heldout30_text/bundled/s101 $O/heldout30_stripe_frame/bundled/s101 $O/heldout30_text/scratch_p16/s101"
for R in $RUNS; do mkdir -p $R/eval_kl; python -m siftlens.cli flag --model $R/model/model.safetensors --motifs $R/eval/spurious --images $R/test --quiet --out $R/eval_kl/flag; done
python frozen33/benchmarks/shortcut_suite/paired_flags.py --new eval_kl --old eval_kl --new-column largest_kl $RUNS > runs/r34/round30_kl.txt
