#!/usr/bin/env bash
# Issue 12's GPU check in one go: build, the CUDA tests, the GPU benches (whole-step graph mode vs
# eager on the builtin RT-DETR at batch 1, 320x320, and Tent's eager floor; ops, update, host
# time; end to end eager for every method) and one JSON, in under 8 minutes.
#
# On the GPU machine (H200, no network), from the repo root, with the pure-Python yolozu wheel
# carried in .whl/ (fetched first on a machine with network access):
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl yolozu==4.12.0          # once, here (py3-none-any)
#     GPU_CHECK_COMMIT=$(git rev-parse --short HEAD) bash benches/gpu_check.sh   # there; carry .whl
#
# Writes $OUT/gpu_check.json (every step's status, seconds, test counts and failures, every
# benchmark's mean/min/median per group and provider with the ratios, the host-time probe) and
# $OUT/gpu_check.log (all output). OUT defaults to a fresh folder under /tmp.
#
#     bash benches/gpu_check.sh --dry-run    # here, without a GPU: the same steps, CPU-sized,
#                                            # no install (the editable install runs)
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/gpu_check_out.XXXXXX)}
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-450} ))  # 7.5 minutes for everything
COMMIT=${GPU_CHECK_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1
: > "$WORK/steps.tsv"

# step NAME SECONDS COMMAND...: run with a timeout (never past the deadline), log, record status
step() {
  local name=$1 limit=$2 left start rc
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 5 )); then
    printf '%s\tskipped\t0\tdeadline\n' "$name" >> "$WORK/steps.tsv"
    echo "=== $name: skipped (deadline)" >> "$LOG"
    return
  fi
  echo "=== $name (limit ${limit}s): $*" >> "$LOG"
  start=$(date +%s%N)
  ( cd "$WORK" && timeout "$limit" "$@" ) >> "$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))e-3" "$limit" >> "$WORK/steps.tsv"
  echo "=== $name: rc $rc" >> "$LOG"
}

PYTEST=("$PY" -m pytest -p no:cacheprovider -q)
if (( DRY )); then
  export YOLOZU_TTT_BENCH_DEVICE=cpu
  BENCH_DEV=cpu
else
  export YOLOZU_TTT_BENCH_DEVICE=cuda
  BENCH_DEV=cuda
  # 0. the carried wheels (yolozu: pure Python; its numpy, Pillow, PyYAML are on the image), then ours
  if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile "$ROOT"/.whl/*.whl
  fi
  step install 240 "$PY" -m pip install -q --no-build-isolation --no-deps "$ROOT"
fi
cat > "$WORK/env_probe.py" <<'EOF'
import json, platform, subprocess
import torch, triton, yolozu_ttt
info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "build_info": yolozu_ttt.build_info(), "yolozu_ttt_file": yolozu_ttt.__file__}
for cmd in (["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            ["lscpu"]):
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        info[cmd[0]] = [l for l in text.splitlines() if cmd[0] != "lscpu" or l.startswith("Model name")]
    except Exception as exc:  # noqa: BLE001
        info[cmd[0]] = str(exc)
print(json.dumps(info, default=str))
EOF
step env 60 bash -c "$PY $WORK/env_probe.py > $WORK/env.json"

# 1. tests (pytest runs from $WORK: the installed package, not the source tree, is imported)
if (( DRY )); then
  step tests 120 "${PYTEST[@]}" --junitxml="$WORK/tests.xml" "$ROOT/tests/test_cuda.py"
else
  # the GPU-only checks first (syncs, graph mode, ops); the rest after graph mode's bench
  step tests 150 "${PYTEST[@]}" --junitxml="$WORK/tests.xml" "$ROOT/tests/test_cuda.py"
fi

# 1b. issue 19's figure: sample-mode adapt+predict images/s at K in {1, 8, 32, 64}, graph mode on
#     and off, bf16, against the reference (builtin RT-DETR, 320x320, tent/norm_only, 1 step), with
#     the allocator's peak per provider
if (( DRY )); then
  step bench_parallel 120 "$PY" "$ROOT/benches/bench_parallel.py" --size 64 --k 2 --bf16-k 2 --repeats 1 \
    --graph --json "$WORK/bench_parallel.json"
else
  step bench_parallel 180 "$PY" "$ROOT/benches/bench_parallel.py" --size 320 --k 8 32 64 --bf16-k 64 --repeats 2 \
    --graph --json "$WORK/bench_parallel.json"
fi

# 1c. the update alone over K rows (one engine for every K): the K-row step (Triton engine, graph
#     mode off and on) vs the torch-ops replica update, K in {8, 32, 64}, tent norm_only and all
if (( DRY )); then
  step bench_rows 60 "$PY" "$ROOT/benches/bench_rows.py" --device cpu --repeats 1 --json "$WORK/bench_rows.json" \
    norm_only:2
else
  step bench_rows 90 "$PY" "$ROOT/benches/bench_rows.py" --device cuda --graph --repeats 5 \
    --json "$WORK/bench_rows.json" norm_only:8,32,64 all:8,32,64
fi

# 2. benches: graph mode (whole step, batch 1, builtin RT-DETR) vs eager and Tent's floor; ops,
#    update, host time (kernels stubbed); end to end eager (fast vs reference vs floor)
BENCH=("${PYTEST[@]}" --benchmark-only --benchmark-disable-gc)
if (( DRY )); then
  step bench_ops 90 "${BENCH[@]}" --benchmark-json="$WORK/bench_ops.json" "$ROOT/benches/bench_host.py" \
    "$ROOT/benches/bench_entropy.py" -k "host or 2x300x81"
  step bench_e2e_eager 120 "${BENCH[@]}" --benchmark-json="$WORK/bench_e2e_eager.json" \
    "$ROOT/benches/bench_run_ttt.py" -k "norm_only and fast"
  step bench_graph 30 "${BENCH[@]}" --benchmark-json="$WORK/bench_graph.json" "$ROOT/benches/bench_graph.py"
else
  step bench_graph 150 "${BENCH[@]}" --benchmark-json="$WORK/bench_graph.json" "$ROOT/benches/bench_graph.py"
  step tests_more 120 "${PYTEST[@]}" --junitxml="$WORK/tests_more.xml" -k "not interpreter and not triton_path" \
    "$ROOT/tests/test_capture.py" "$ROOT/tests/test_kernels_update.py" "$ROOT/tests/test_ops.py" \
    "$ROOT/tests/test_run.py::test_cuda_runs_match_the_reference_on_cuda" \
    "$ROOT/tests/test_run.py::test_cuda_nan_batch_rolls_back_bit_exactly"
  step bench_ops 120 "${BENCH[@]}" --benchmark-json="$WORK/bench_ops.json" "$ROOT/benches/bench_entropy.py" \
    "$ROOT/benches/bench_mim.py" "$ROOT/benches/bench_update.py" "$ROOT/benches/bench_host.py"
  step bench_e2e_eager 150 "${BENCH[@]}" --benchmark-json="$WORK/bench_e2e_eager.json" \
    "$ROOT/benches/bench_run_ttt.py" "$ROOT/benches/bench_methods.py"
fi

# 3. the fused step's host time with real launches: enqueue time per call, wall time per step with
#    its one read, the same through a CUDA graph, and the kernels' device time (torch.profiler)
cat > "$WORK/host_probe.py" <<'EOF'
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from conftest import rtdetr_param_sizes
from yolozu_ttt.common import STAT_KEYS
from yolozu_ttt.engine import StepSpec
from yolozu_ttt.kernels import update as U

def us(xs):
    return {"median_us": statistics.median(xs) * 1e6, "min_us": min(xs) * 1e6}

def bound(filt, device, numel_cap=None):
    """One Triton arena group over the RT-DETR selection ``filt`` (the dry run: its first segments,
    at most ``numel_cap`` elements), its stats buffer and the step's spec."""
    sizes = list(rtdetr_param_sizes(filt))
    while numel_cap is not None and sum(sizes) > numel_cap and len(sizes) > 1:
        sizes.pop()
    n = sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    p = torch.randn(n, device=device)
    grad = torch.randn(n, device=device) * 1e-3
    group = U.TritonArenaGroup(p, grad, torch.zeros_like(p), torch.zeros_like(p), p.clone(), torch.empty_like(p),
                               offsets, list(sizes), bytearray(b"\x01" * len(sizes)))
    out = torch.empty(len(STAT_KEYS), dtype=torch.float64, device=device)
    return group, out, StepSpec(lr=1e-4, max_grad_norm=1.0, write_snapshot=True), sizes

result = {}
if not torch.cuda.is_available():  # the dry run: the same calls once, on the CPU (TRITON_INTERPRET=1)
    for filt in ("all", "norm_only"):
        group, out, spec, sizes = bound(filt, "cpu", numel_cap=50_000)
        U.fused_step([group], out, spec)
        U.prepare_step([group], out, spec).run()
        result[filt] = {"tensors": len(sizes), "stats": out.tolist(), "dry_run": True}
    print(json.dumps(result))
    sys.exit(0)
for filt in ("all", "norm_only"):
    group, out, spec, sizes = bound(filt, "cuda")
    host = torch.empty(len(STAT_KEYS), dtype=torch.float64, pin_memory=True)
    step = lambda: U.fused_step([group], out, spec)
    def read():
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
    for _ in range(20):
        step(); read()
    enqueue = []
    for _ in range(100):
        t0 = time.perf_counter(); step(); enqueue.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    wall = []
    for _ in range(100):
        t0 = time.perf_counter(); step(); read(); wall.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    dev_us = 0.0
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            dev_us += float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
    group.reset_state()
    launch = U.prepare_step([group], out, spec)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch.run()
    graph.replay(); read()
    graphed = []
    for _ in range(100):
        t0 = time.perf_counter(); U.prepare_step([group], out, spec); graph.replay(); read()
        graphed.append(time.perf_counter() - t0)
    result[filt] = {"tensors": len(sizes), "numel": sum(sizes), "enqueue": us(enqueue), "wall_with_read": us(wall),
                    "graph_wall_with_read": us(graphed), "device_kernels_us_per_step": dev_us / 20}
print(json.dumps(result))
EOF
if (( DRY )); then
  step host_probe 120 env TRITON_INTERPRET=1 bash -c "$PY $WORK/host_probe.py $ROOT/benches > $WORK/host_probe.json"
else
  step host_probe 60 bash -c "$PY $WORK/host_probe.py $ROOT/benches > $WORK/host_probe.json"
fi

# 4. one JSON
cat > "$WORK/merge.py" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
work, out, commit, dry = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
doc = {"commit": commit, "dry_run": dry, "steps": [], "tests": None, "benchmarks": {}, "ratios": {}, "host_probe": None}
for line in open(os.path.join(work, "steps.tsv")):
    name, rc, secs, limit = line.rstrip("\n").split("\t")
    doc["steps"].append({"step": name, "rc": rc, "seconds": round(float(secs or 0), 1), "limit": limit})
doc["passed"] = all(s["rc"] == "0" for s in doc["steps"])
counts, failed = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0), []
for xml in (os.path.join(work, "tests.xml"), os.path.join(work, "tests_more.xml")):
    if not os.path.exists(xml):
        continue
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:  # a step killed while writing
        failed.append({"test": os.path.basename(xml), "message": f"unreadable junit xml: {exc}"})
        continue
    suites = [root] if root.tag == "testsuite" else list(root)
    for k in counts:
        counts[k] += sum(int(s.get(k, 0)) for s in suites)
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "message": (bad.get("message") or "")[:400]})
if counts["tests"] or failed:
    doc["tests"] = dict(counts, failed=failed)
for name in ("bench_graph", "bench_ops", "bench_e2e_eager"):
    path = os.path.join(work, name + ".json")
    try:  # a step that was skipped, timed out or benched nothing leaves no file or an empty one
        data = json.load(open(path))
    except (OSError, ValueError) as exc:
        doc.setdefault("missing", {})[name] = f"{type(exc).__name__}: {exc}"[:200]
        continue
    doc.setdefault("machine_info", data.get("machine_info", {}).get("cpu", {}).get("brand_raw"))
    groups = doc["benchmarks"].setdefault(name, {})
    for b in data["benchmarks"]:
        provider = b["extra_info"].get("provider") or b.get("params", {}).get("provider") or b["name"]
        s = b["stats"]
        entry = {"mean_ms": s["mean"] * 1e3, "min_ms": s["min"] * 1e3, "median_ms": s["median"] * 1e3, "rounds": s["rounds"]}
        entry.update({k: v for k, v in b["extra_info"].items() if k not in ("provider",)})
        groups.setdefault(b["group"] or b["name"], {})[provider] = entry
    for group, prov in groups.items():
        r = {}
        if "reference" in prov and "fast" in prov:
            r["speedup_mean"] = prov["reference"]["mean_ms"] / prov["fast"]["mean_ms"]
            r["speedup_min"] = prov["reference"]["min_ms"] / prov["fast"]["min_ms"]
        if "floor" in prov and "fast" in prov:
            r["fast_over_floor_min"] = prov["fast"]["min_ms"] / prov["floor"]["min_ms"]
        if "graph" in prov:  # bench_graph: whole-step graph mode vs eager fast (and Tent's eager floor)
            if "floor" in prov:
                r["graph_speedup_over_floor_min"] = prov["floor"]["min_ms"] / prov["graph"]["min_ms"]
            if "fast" in prov:
                r["graph_speedup_over_fast_min"] = prov["fast"]["min_ms"] / prov["graph"]["min_ms"]
            r["whole_step"] = prov["graph"].get("whole_step")
        if r:
            doc["ratios"][f"{name}: {group}"] = r
env = os.path.join(work, "env.json")
if os.path.exists(env) and os.path.getsize(env):
    doc["env"] = json.load(open(env))
par = os.path.join(work, "bench_parallel.json")
if os.path.exists(par) and os.path.getsize(par):
    doc["bench_parallel"] = json.load(open(par))
rows = os.path.join(work, "bench_rows.json")
if os.path.exists(rows) and os.path.getsize(rows):
    doc["bench_rows"] = json.load(open(rows))
probe = os.path.join(work, "host_probe.json")
if os.path.exists(probe) and os.path.getsize(probe):
    doc["host_probe"] = json.load(open(probe))
json.dump(doc, open(os.path.join(out, "gpu_check.json"), "w"), indent=1, default=str)
print(json.dumps({"steps": doc["steps"], "tests": doc["tests"] and {k: v for k, v in doc["tests"].items() if k != "failed"},
                  "failed": doc["tests"] and [f["test"] for f in doc["tests"]["failed"]]}, indent=1))
EOF
"$PY" "$WORK/merge.py" "$WORK" "$OUT" "$COMMIT" "$DRY" | tee -a "$LOG"
echo "gpu_check: $OUT/gpu_check.json ($(( $(date +%s) - DEADLINE + ${GPU_CHECK_SECONDS:-450} )) s)"
