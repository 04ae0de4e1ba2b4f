#!/usr/bin/env bash
# Regenerates every reference result in results/ from scratch (about 15 minutes on a 2-core CPU).
#   bash scripts/reproduce.sh            # all of them
#   bash scripts/reproduce.sh dqn_cartpole baird   # some of them
# Each ablation trains through `rlstop ablate` into runs/reproduce/, then its run folders
# (config, metrics, summary; no checkpoints), figures and tables are copied to results/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/reproduce}
ONLY=("$@")

want() { [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $1 "* ]]; }

ablate() {  # name config overrides...
  local name=$1 cfg=$2; shift 2
  want "$name" || return 0
  echo "== $name: rlstop ablate $cfg $*"
  local t0=$SECONDS
  rlstop ablate "$cfg" "$@" --out "$OUT/$name" --quiet
  local src
  src=$(ls -d "$OUT/$name"/*_ablate)
  rm -rf "results/$name"
  mkdir -p "results/$name"
  for run in "$src"/*/; do
    [ -f "$run/summary.json" ] || continue
    mkdir -p "results/$name/runs/$(basename "$run")"
    cp "$run"/config.yaml "$run"/metrics.csv "$run"/summary.json "results/$name/runs/$(basename "$run")/"
  done
  cp "$src"/sweep.json "results/$name/"
  rlstop compare "results/$name/runs" --out "results/$name" > /dev/null
  printf 'rlstop ablate %s %s\nrlstop compare results/%s/runs --out results/%s\n' "$cfg" "$*" "$name" "$name" \
    > "results/$name/COMMAND"
  echo "   $((SECONDS - t0)) s"
}

ablate dqn_cartpole configs/dqn_cartpole.yaml train.seeds=8
ablate dqn_acrobot configs/dqn_acrobot.yaml train.seeds=8
ablate a2c_cartpole configs/a2c_cartpole.yaml train.seeds=8
ablate ppo_cartpole configs/ppo_cartpole.yaml train.seeds=8
ablate baird_sampled configs/baird.yaml train.seeds=16
ablate baird_expected configs/baird.yaml agent.update=expected train.seeds=1
if want baird; then
  echo "== baird figure 11.2"
  python scripts/baird_figure.py --out "$OUT/baird" --seeds 10
fi
if want scaling; then
  echo "== scaling (CPU)"
  # The measured table; results/scaling/cpu.md describes it (and is not overwritten).
  python scripts/bench.py --scale --json results/scaling/cpu.json | tee results/scaling/table.md
fi
