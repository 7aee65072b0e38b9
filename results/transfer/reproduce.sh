#!/usr/bin/env bash
# Reproduces every number in results/transfer/README.md on a 2-core CPU machine (no GPU, no
# internet). Each step resumes where it stopped when run again: the search and the elimination
# keep everything in $RUN/run.sqlite, compare keeps its runs in $RUN/compare.sqlite (delete it
# to train the table whole). Long: run it under nohup and rerun it after a stop. Step 4 copies
# both stores into $OUT as checkpointed single files.
set -euo pipefail
cd "$(dirname "$0")/../.."
GP=".venv/bin/gp-loss"
RUN="${RUN:-runs/transfer}"
OUT="results/transfer"
export GP_LOSS_CACHE=off   # train everything here: no results from earlier runs

# 1. The search on three tasks (search_runs/transfer.toml): mnist5k / tiny CNN at lr 1e-2 and
#    at 2.5e-3, and digits / MLP. Fitness = mean over the tasks of (validation accuracy -
#    ce_torch's validation accuracy on that task, same settings and seed). Validation only.
if [ ! -f "$RUN/run.sqlite" ]; then
  $GP search search_runs/transfer.toml --run-dir "$RUN"
else
  $GP resume "$RUN"
fi

# 2. Elimination on the same three tasks: the best 12 distinct candidates retrained in rounds
#    of rising budget (12 -> 6 -> 3; each task's steps x1, x2, x3; 3 seeds each), scored by
#    the mean validation accuracy over seeds and tasks. Validation only.
$GP eliminate "$RUN" --set 'eliminate.keep=[12,6,3]' --set 'eliminate.steps_factor=[1,2,3]' \
    --set 'eliminate.seeds=[3]' --json > "$OUT/eliminate.json"

# 3. The table, on held-out cells only (none of them trained a candidate during the search):
#    ResNet9V2 on mnist5k (all and 10 % of the training split), the MLP on mnist5k (the search
#    used the MLP only on digits), and digits with ResNet9V2 (never searched). The 3 finalists
#    and six baselines, each with its own learning rate per cell: chosen from the --lr grid by
#    mean validation accuracy on 2 tuning seeds (110, 111), then 10 test seeds (100-109) x 2
#    train/validation splits. Holm over the table; the reference is ce_torch.
COMPARE=(--from-run "$RUN" --top 3 --loss label_smoothing --loss ce --loss baikal --loss focal
         --loss i1e_ratio --config search_runs/mnist5k.toml
         --set surrogate.timeout_s=0 --set executor.candidates_per_worker=2
         --cell model=resnet9v2 --cell model=resnet9v2,train_fraction=0.1 --cell model=mlp
         --cell dataset=digits,model=resnet9v2,image_size=0,steps=300,train_fraction=0.25
         --lr 2.5e-3 --lr 5e-3 --lr 1e-2 --lr 2e-2 --lr 4e-2 --tune-seeds 2
         --seeds 10 --first-seed 100 --split-seeds 2 --bootstrap 10000 --workers 2
         --store "$RUN/compare.sqlite")
$GP compare "${COMPARE[@]}" --markdown "$OUT/compare.md" --json > "$OUT/compare.json"
# The same runs against tuned label smoothing (all from the store: nothing trains again).
$GP compare "${COMPARE[@]}" --reference label_smoothing \
    --markdown "$OUT/compare_vs_label_smoothing.md" --json > "$OUT/compare_vs_label_smoothing.json"

# 4. Pictures, the exported losses, and checkpointed copies of the stores (VACUUM INTO: a
#    consistent single file, never a live WAL).
$GP plot "$RUN" -o "$OUT/plots" --top 3
$GP export "$RUN" --top 3 -o "$OUT/losses.py"
for db in run compare; do
  rm -f "$OUT/$db.sqlite"
  .venv/bin/python -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('VACUUM INTO ?', (sys.argv[2],))" \
      "$RUN/$db.sqlite" "$OUT/$db.sqlite"
done
