#!/usr/bin/env bash
# Two "machines" on one host: two torchrun agents (--nnodes 2, one worker each) meeting through a
# c10d rendezvous on localhost export the bench's dataset (export-predictions --ttt --ttt-reset
# sample, Tent norm_only, builtin RT-DETR at 320x320, 8 images; see bench_export.py); then one
# process exports the same, and the two outputs are compared (same records in the same order,
# largest score/box difference). Too slow for CI; run by hand:
#
#     benches/multinode_export.sh [WORKDIR]          # PORT=29531 by default
#
# On real machines run the same agent command on each host with --rdzv-endpoint HOST0:PORT
# and an --output on a filesystem every host shares (the part files and the merge live there).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$(mktemp -d /tmp/yolozu_ttt_multinode.XXXXXX)}
port=${PORT:-29531}
mkdir -p "$work"
args=$(cd "$here" && python -c "import bench_export, pathlib, shlex; print(shlex.join(bench_export.prepare(pathlib.Path('$work'))))")
eval "set -- $args"

agent() {
  OMP_NUM_THREADS=1 python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 \
    --rdzv-backend c10d --rdzv-endpoint "localhost:$port" --rdzv-id "yolozu-ttt-multinode-$$" \
    -m yolozu_ttt export-predictions "$@" --output "$work/multinode.json" --ttt-log-out "$work/multinode_log.json"
}
start=$(date +%s.%N)
agent "$@" > "$work/node_a.log" 2>&1 & a=$!
agent "$@" > "$work/node_b.log" 2>&1 & b=$!
status=0
wait $a || status=$?
wait $b || status=$?
end=$(date +%s.%N)
if [ "$status" != 0 ]; then
  echo "multinode run failed ($status)"; tail -30 "$work/node_a.log" "$work/node_b.log"; exit 1
fi
echo "two agents (--nnodes 2 x --nproc-per-node 1, c10d on localhost): wall $(python -c "print(f'{$end - $start:.2f}')") s"
grep -h "yolozu-ttt export:" "$work/node_a.log" "$work/node_b.log"

start=$(date +%s.%N)
python -m yolozu_ttt export-predictions "$@" --output "$work/single.json" > "$work/single.log" 2>&1
end=$(date +%s.%N)
echo "one process ($(python -c 'import os; print(len(os.sched_getaffinity(0)))') threads): wall $(python -c "print(f'{$end - $start:.2f}')") s"

python - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
multi, single = (json.loads((work / f"{n}.json").read_text()) for n in ("multinode", "single"))
a, b = single["predictions"], multi["predictions"]
assert [e["image"] for e in a] == [e["image"] for e in b], "record order differs"
worst = 0.0
for ea, eb in zip(a, b):
    assert len(ea["detections"]) == len(eb["detections"]) > 0, ea["image"]
    for da, db in zip(ea["detections"], eb["detections"]):
        worst = max(worst, abs(da["score"] - db["score"]), *(abs(da["bbox"][k] - db["bbox"][k]) for k in ("cx", "cy", "w", "h")))
ttt = multi["meta"]["ttt"]
log = json.loads((work / "multinode_log.json").read_text())["ttt"]
assert ttt["world_size"] == 2 and ttt["distributed_backend"] == "gloo" and log["world_size"] == 2
assert not (work / "multinode.json.parts").exists() and not (work / "multinode.json.lock").exists()
print(f"merged == one process: {len(b)} records in the same order, max |score/box diff| {worst:.2e}; "
      f"meta ttt world_size={ttt['world_size']} distributed_backend={ttt['distributed_backend']}")
assert worst <= 1e-4
PY
