#!/usr/bin/env bash
# Does a change alter what the search does? Run one small fixed-seed search in each of two
# checkouts (serial executor, fresh fitness cache, 16 children on the digits data, about 10 s
# each; each checkout's own search_runs/quick.toml and primitives/) and compare every stored
# candidate: id, phase, birth, expression, status, fitness, reason, sign, canonical key and the
# final weights' hash. Exit 0 when they are identical.
#
#   analysis/same_search.sh OLD_CHECKOUT [NEW_CHECKOUT]     (NEW defaults to this checkout)
#   e.g.  git worktree add /tmp/old <commit> && analysis/same_search.sh /tmp/old
#
# Only the serial executor is reproducible child for child: with several workers, results
# arrive in completion order and the children proposed depend on it.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
old="$(cd "${1:?usage: same_search.sh OLD_CHECKOUT [NEW_CHECKOUT]}" && pwd)"
new="$(cd "${2:-$here}" && pwd)"
out="$(mktemp -d)"

dump() {  # dump CHECKOUT NAME: run the search from CHECKOUT, write $out/NAME.tsv
    # Each checkout's own code, quick config and primitive sets (an editable install elsewhere
    # would otherwise serve the installed checkout's primitives/ and search_runs/).
    (cd "$1" && GP_LOSS_CACHE="$out/$2.cache" GP_LOSS_PSET_PATH="$1/primitives" PYTHONPATH="$1" \
        "$py" -m gp_loss -q search "$1/search_runs/quick.toml" \
        --run-dir "$out/$2" --set executor.kind=serial \
        --set search.children=16 --set search.initial=12 --set search.population=6 \
        --set search.tournament=3 --set surrogate.steps=60 --set surrogate.prescreen_steps=20 \
        --set surrogate.eval_every=20 > "$out/$2.log" 2>&1) || { tail -5 "$out/$2.log"; exit 2; }
    "$py" - "$out/$2" <<'PY'
import sqlite3, sys
con = sqlite3.connect(f"{sys.argv[1]}/run.sqlite")
rows = con.execute("SELECT id, phase, birth, expr, status, fitness, reason, sign, key, "
                   "json_extract(result_json, '$.weights_hash') "
                   "FROM candidates ORDER BY id").fetchall()
with open(sys.argv[1] + ".tsv", "w") as f:
    f.writelines("\t".join(map(str, r)) + "\n" for r in rows)
PY
}

dump "$old" old
dump "$new" new
rows=$(wc -l < "$out/new.tsv")
if cmp -s "$out/old.tsv" "$out/new.tsv"; then
    echo "identical: $rows candidates ($out/old.tsv, $out/new.tsv)"
else
    echo "DIFFERENT ($out/old.tsv vs $out/new.tsv):"
    diff "$out/old.tsv" "$out/new.tsv" | head -20
    exit 1
fi
