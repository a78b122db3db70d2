"""Dataset-scale export: torchrun shards, part files, --resume, failures (yolozu_ttt.export).

Workers run under ``python -m torch.distributed.run --standalone --nproc-per-node 2`` (gloo, one
thread each) on a shrunk RT-DETR at 64x64 over a few images of YOLOZU's demo dataset (each image
also mirrored, so no two records are alike). The single-process runs happen in this process.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import support_export
from conftest import max_prediction_diff

import yolozu_ttt
from yolozu_ttt import cli, export

N_SAMPLE = 8    # images in the sample-mode runs (4 per rank)
N_STREAM = 8    # images in the stream-mode runs
TOL = 1e-4      # 1 thread per worker vs 2 threads in one process: float reduction order only


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return support_export.tiny_export_data(tmp_path_factory.mktemp("export"))


_args = support_export.export_args


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "yolozu_ttt", "export-predictions", *args]


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(args, nproc), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _single(args: list[str]) -> None:
    assert cli.main(["export-predictions", *args]) == 0


def _assert_losses_close(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)


def _assert_reports_close(a: dict, b: dict) -> None:
    """YOLOZU's report shape, same counts, losses within tolerance (sample: per image, in order)."""
    assert set(a) == set(b)
    if a.get("mode") == "sample":
        for key in ("samples_total", "samples_kept", "samples_truncated"):
            assert a[key] == b[key], key
        assert [(s["index"], s["image"]) for s in a["per_sample"]] == [(s["index"], s["image"]) for s in b["per_sample"]]
        for sa, sb in zip(a["per_sample"], b["per_sample"]):
            assert sa["report"]["steps_run"] == sb["report"]["steps_run"]
            _assert_losses_close(sa["report"]["losses"], sb["report"]["losses"])
    else:
        for key in ("steps_run", "batches_used", "optimizer_steps", "stop_reason"):
            assert a[key] == b[key], key
        _assert_losses_close(a["losses"], b["losses"])


def _entries(parts: Path) -> dict[int, dict]:
    return export.read_parts(parts)[1]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> dict[str, dict]:
    """One process, no torchrun, no --resume: the definition the sharded runs must reproduce."""
    out = tmp_path_factory.mktemp("single")
    results = {}
    for name, reset, n, backend in (("none", None, N_SAMPLE, "fast"),
                                     ("sample-fast", "sample", N_SAMPLE, "fast"),
                                     ("sample-reference", "sample", N_SAMPLE, "reference"),
                                     ("stream-fast", "stream", N_STREAM, "fast"),
                                     ("stream-reference", "stream", N_STREAM, "reference")):
        path = out / f"{name}.json"
        _single([*_args(data, reset=reset, n=n, backend=backend), "--output", str(path)])
        results[name] = json.loads(path.read_text())
    return results


# ---------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------
def test_shard_bounds_are_contiguous_and_batch_aligned():
    for n in range(0, 23):
        for world in (1, 2, 3, 5):
            for unit in (1, 2, 4):
                bounds = [export.shard_bounds(n, world, r, unit) for r in range(world)]
                assert bounds[0][0] == 0 and bounds[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                assert all(start % unit == 0 or start == n for start, _ in bounds)
                batches = [-(-(stop - start) // unit) for start, stop in bounds]  # inference batches per rank
                assert max(batches) - min(batches) <= 1
    assert export.shard_bounds(8, 2, 0) == (0, 4) and export.shard_bounds(8, 2, 1) == (4, 8)


def test_torchrun_environment_is_read():
    assert export.DistEnv.from_environ({}) is None
    env = export.DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.torchrun) == (3, 4, 1, 2, True)
    with pytest.raises(SystemExit, match="invalid torchrun environment"):
        export.DistEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"})


# ---------------------------------------------------------------------------------------
# 2 workers == 1 process
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sample-fast", "sample-reference", "stream-fast", "stream-reference"])
def test_two_workers_equal_one_process(data, single, tmp_path, case):
    reset, backend = case.split("-")
    n = N_SAMPLE if reset == "sample" else N_STREAM
    out, log = tmp_path / "out.json", tmp_path / "log.json"
    res = _torchrun([*_args(data, reset=reset, n=n, backend=backend), "--output", str(out), "--ttt-log-out", str(log)],
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    merged, one = json.loads(out.read_text()), single[case]

    # same records, same order, same detections within float tolerance
    assert max_prediction_diff(one["predictions"], merged["predictions"]) <= TOL
    # ... and TTT visibly changed them (so a rank predicting with unadapted weights would fail above)
    assert max_prediction_diff(single["none"]["predictions"][:n], merged["predictions"]) > 100 * TOL
    assert merged["meta"]["images"] == one["meta"]["images"] == n
    assert merged["meta"]["task_coverage"] == one["meta"]["task_coverage"]

    ttt, ttt_one = merged["meta"]["ttt"], one["meta"]["ttt"]
    assert ttt["world_size"] == 2 and ttt["distributed_backend"] == "gloo"
    assert "world_size" not in ttt_one  # one process without --resume: unchanged
    assert ttt.get("backend") == ttt_one.get("backend") == ("fast" if backend == "fast" else None)
    assert set(ttt) - {"world_size", "distributed_backend"} == set(ttt_one)
    _assert_reports_close(ttt_one["report"], ttt["report"])
    logged = json.loads(log.read_text())
    assert logged["output"] == str(out)
    assert logged["ttt"]["world_size"] == 2 and logged["ttt"]["report"] == ttt["report"]

    # the part files are gone after the merge; one progress bar over all ranks; what was computed
    assert not Path(str(out) + ".parts").exists()
    assert f"{n}/{n}" in res.stderr and "export (2 workers)" in res.stderr
    assert f"{n} images, 2 worker(s), gloo: {n} computed, 0 from part files" in res.stderr
    if reset == "stream":
        assert "stream adaptation ran" in res.stderr


# ---------------------------------------------------------------------------------------
# kill a worker, resume
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(data, tmp_path_factory) -> dict:
    """A 2-worker sample-mode run whose rank 1 is SIGKILLed after its second image."""
    root = tmp_path_factory.mktemp("killed")
    out = root / "out.json"
    parts = Path(str(out) + ".parts")
    proc = subprocess.Popen(_torchrun_cmd([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out)]),
                            cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            for path in parts.glob("part-*-r00001.jsonl"):
                lines = path.read_bytes().split(b"\n")
                if len(lines) >= 4:  # header + 2 finished images
                    victim = json.loads(lines[0])["pid"]
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                break
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert victim is not None, "the run ended before a worker could be killed"
    assert proc.returncode != 0
    done = _entries(parts)
    assert 2 <= len(done) < N_SAMPLE, len(done)
    assert not out.exists()  # no output that looks complete
    return {"root": root, "parts": parts, "done": sorted(done), "stderr": stderr}


def _copy_parts(killed: dict, out: Path) -> Path:
    parts = Path(str(out) + ".parts")
    shutil.copytree(killed["parts"], parts)
    return parts


def test_killed_run_resumes_in_one_process(data, single, killed, tmp_path, fast_backend_calls):
    """Different worker count (1): only the images missing from the part files are adapted."""
    out = tmp_path / "out.json"
    _copy_parts(killed, out)
    _single([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out), "--resume"])
    adapted = [r["image"] for records in fast_backend_calls for r in records]
    merged, one = json.loads(out.read_text()), single["sample-fast"]
    images = [e["image"] for e in one["predictions"]]
    assert sorted(adapted) == sorted(images[i] for i in range(N_SAMPLE) if i not in killed["done"])
    assert len(adapted) + len(killed["done"]) == N_SAMPLE  # no image adapted twice
    assert max_prediction_diff(one["predictions"], merged["predictions"]) <= TOL
    _assert_reports_close(one["meta"]["ttt"]["report"], merged["meta"]["ttt"]["report"])
    assert merged["meta"]["ttt"]["world_size"] == 1 and merged["meta"]["ttt"]["distributed_backend"] is None
    assert not Path(str(out) + ".parts").exists()


def test_killed_run_resumes_with_two_workers(data, single, killed, tmp_path):
    out = tmp_path / "out.json"
    _copy_parts(killed, out)
    res = _torchrun([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out), "--resume"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    d = len(killed["done"])
    assert f"{N_SAMPLE - d} computed, {d} from part files" in res.stderr
    merged = json.loads(out.read_text())
    assert max_prediction_diff(single["sample-fast"]["predictions"], merged["predictions"]) <= TOL
    _assert_reports_close(single["sample-fast"]["meta"]["ttt"]["report"], merged["meta"]["ttt"]["report"])


def test_resume_refuses_changed_flags_before_any_work(data, killed, tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    parts = _copy_parts(killed, out)
    before = sorted(p.name for p in parts.iterdir())
    calls = []
    monkeypatch.setattr(cli.FastBackend, "__call__", lambda *a, **k: calls.append(1))
    args = _args(data, reset="sample", n=N_SAMPLE)
    changed = [*args[: args.index("--ttt-steps") + 1], "3", *args[args.index("--ttt-steps") + 2:]]
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", *changed, "--output", str(out), "--resume"])
    message = str(exc.value.code)
    assert message.startswith(f"--resume: the part files in {parts} were made with different export flags")
    assert "--ttt-steps 1 -> 3" in message
    # under torchrun (here: what `--nproc-per-node 1` sets) existing part files are never ignored
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=r"holds part files of an earlier run \(\d+ images done\): pass --resume"):
        cli.main(["export-predictions", *args, "--output", str(out)])
    assert calls == [] and sorted(p.name for p in parts.iterdir()) == before and not out.exists()


@pytest.mark.parametrize("reset", ["sample", "stream"])
def test_failed_merge_keeps_part_files_and_resume_adapts_nothing(data, single, tmp_path, monkeypatch, reset,
                                                                fast_backend_calls):
    """The final file is written to a temporary file and renamed into place; if the merge fails the
    part files (and the stream state) stay, and --resume then finishes without adapting again."""
    n = N_SAMPLE if reset == "sample" else N_STREAM
    out = tmp_path / "out.json"
    args = [*_args(data, reset=reset, n=n), "--output", str(out), "--resume"]
    adapted = fast_backend_calls
    real_replace = os.replace

    def disk_full(src, dst):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    assert cli.main(["export-predictions", *args]) == 1  # one line, no traceback (tests below)
    assert not out.exists() and not list(tmp_path.glob(".out.json.tmp-*"))  # no partial output left behind
    assert sorted(_entries(Path(str(out) + ".parts"))) == list(range(n))
    assert [len(records) for records in adapted] == ([1] * n if reset == "sample" else [n])

    renamed = []
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(dst)) or real_replace(src, dst))
    adapted.clear()
    _single(args)
    assert adapted == [] and out in renamed
    merged, one = json.loads(out.read_text()), single[f"{reset}-fast"]
    assert max_prediction_diff(one["predictions"], merged["predictions"]) <= TOL
    _assert_reports_close(one["meta"]["ttt"]["report"], merged["meta"]["ttt"]["report"])
    assert not Path(str(out) + ".parts").exists()


# ---------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------
def _dataset_copy(data, root: Path, n: int) -> Path:
    images = root / "ds" / "images" / "val"
    images.mkdir(parents=True)
    for path in sorted((data["dataset"] / "images" / "val").glob("*.png"))[:n]:
        shutil.copy(path, images / path.name)
    return root / "ds"


def test_unreadable_image_fails_with_rank_and_path_and_keeps_finished_work(data, tmp_path):
    ds = _dataset_copy(data, tmp_path, 8)
    bad = ds / "images" / "val" / "img_005.png"  # rank 1's second image
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    out = tmp_path / "out.json"
    args = [*_args(data, reset="sample", n=8, dataset=ds), "--output", str(out)]
    res = _torchrun(args, cwd=tmp_path)
    assert res.returncode != 0
    assert re.search(rf"TTT failed: .*\(rank 1 of 2, image {re.escape(str(bad))}\)", res.stderr), res.stderr[-4000:]
    assert not out.exists()
    done = _entries(Path(str(out) + ".parts"))
    assert 4 in done and 5 not in done  # rank 1's first image was kept, the bad one never written

    # fix the image, resume in one process: only the missing images are computed
    bad.write_bytes(good)
    _single([*args, "--resume"])
    merged = json.loads(out.read_text())
    assert [e["image"] for e in merged["predictions"]] == sorted(str(p) for p in (ds / "images" / "val").glob("*.png"))
    assert merged["meta"]["ttt"]["report"]["samples_total"] == 8


def test_missing_image_refused_before_any_work(data, tmp_path, monkeypatch):
    ds = _dataset_copy(data, tmp_path, 6)
    missing = ds / "images" / "val" / "img_004.png"
    missing.unlink()
    missing.symlink_to(tmp_path / "nowhere.png")  # listed by the dataset, not a file
    out = tmp_path / "out.json"
    built = []
    monkeypatch.setattr(cli.FastBackend, "__call__", lambda *a, **k: built.append(1))
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", *_args(data, reset="sample", n=6, dataset=ds), "--output", str(out), "--resume"])
    assert str(exc.value.code) == f"image not found: {missing} (rank 0 of 1, record 4)"
    assert built == [] and not out.exists()
    assert not Path(str(out) + ".parts").exists()  # made by the check, removed with nothing in it


def test_unwritable_output_folder_refused(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the output folder should be (also refused as root)
    out = blocker / "sub" / "out.json"
    with pytest.raises(SystemExit, match=rf"output folder is not writable: {re.escape(str(out.parent))}"):
        cli.main(["export-predictions", *_args(data, reset="sample", n=2), "--output", str(out), "--resume"])


def test_dist_timeout_must_be_positive(data, tmp_path):
    with pytest.raises(SystemExit, match="--dist-timeout must be > 0"):
        cli.main(["export-predictions", *_args(data, reset=None, n=2), "--output", str(tmp_path / "o.json"),
                  "--resume", "--dist-timeout", "0"])


# ---------------------------------------------------------------------------------------
# faults: one live run per output, launcher death, elastic restarts, progress
# ---------------------------------------------------------------------------------------
HELPER = Path(__file__).with_name("support_export.py")
GONE_WITHIN_S = 5.0  # a worker whose launcher died stops within this


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> bytes:
    """The file an uninterrupted 2-worker sample-mode run writes: what faulted runs must reproduce."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out = root / "out.json"
    res = _torchrun([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out)], cwd=root)
    assert res.returncode == 0, res.stderr[-4000:]
    return out.read_bytes()


class _Tree:
    """A torchrun launcher started in the background; its whole process tree is killed at the end."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.log = cwd / f"torchrun-{time.monotonic_ns()}.err"  # a file: readable while it runs
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=subprocess.DEVNULL, stderr=err,
                                         stdin=subprocess.DEVNULL)
        self.seen: set[int] = set()

    def wait(self, timeout: float) -> int | None:
        """The launcher's exit status, or None if it is still running after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        found = support_export.children(self.proc.pid)
        self.seen.update(found)
        return found

    def close(self) -> str:
        """Kill the launcher and every worker it started; its stderr so far."""
        self.seen.update(support_export.children(self.proc.pid))
        support_export.kill_tree([self.proc.pid, *self.seen])
        self.wait(30)
        return self.stderr()


MEASURED = ("timestamp", "seconds", "memory")  # what differs between any two runs: clocks and RSS


def _unmeasured(obj):
    if isinstance(obj, dict):
        return {k: (None if k in MEASURED else _unmeasured(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unmeasured(v) for v in obj]
    return obj


def _assert_same_file(path: Path, expected: bytes) -> None:
    """The same file as ``expected``, byte for byte once clocks and RSS readings are set aside
    (predictions, reports and losses exactly equal)."""
    got, want = _unmeasured(json.loads(path.read_bytes())), _unmeasured(json.loads(expected))
    if got != want:
        import difflib

        diff = difflib.unified_diff(json.dumps(want, indent=1, sort_keys=True).splitlines(),
                                    json.dumps(got, indent=1, sort_keys=True).splitlines(), lineterm="", n=2)
        raise AssertionError("\n".join(list(diff)[:60]))


def test_killed_launcher_takes_its_workers_with_it_and_resume_gives_the_same_file(data, uninterrupted, tmp_path):
    out = tmp_path / "out.json"
    parts = Path(str(out) + ".parts")
    tree = _Tree(_torchrun_cmd([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out)]), tmp_path,
                 support_export.held_env(_env(), tmp_path, at=2))
    try:  # both workers mid-shard: each holds at its second image, its first written
        assert support_export.wait_until(lambda: len(list(tmp_path.glob("held-*"))) == 2, 120)
        workers = tree.workers()
        assert len(workers) >= 2
        os.kill(tree.proc.pid, signal.SIGKILL)  # the launcher alone
        assert support_export.wait_until(lambda: not any(support_export.alive(p) for p in workers), GONE_WITHIN_S), \
            [p for p in workers if support_export.alive(p)]
    finally:
        tree.close()
    assert not out.exists()  # the workers did not go on to merge by themselves
    done = _entries(parts)
    assert 0 < len(done) < N_SAMPLE
    res = _torchrun([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out), "--resume"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "taking over the stale lock" in res.stderr and "is gone" in res.stderr
    assert f"{N_SAMPLE - len(done)} computed, {len(done)} from part files" in res.stderr
    _assert_same_file(out, uninterrupted)
    assert not parts.exists() and not Path(str(out) + ".lock").exists()


def test_second_run_on_a_live_output_is_refused(data, uninterrupted, tmp_path, capfd, fast_backend_calls):
    out = tmp_path / "out.json"
    lock = Path(str(out) + ".lock")
    args = [*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out)]
    tree = _Tree(_torchrun_cmd(args), tmp_path)
    try:
        assert support_export.wait_until(lock.exists, 120)
        holder = json.loads(lock.read_text())
        pids = [tree.proc.pid, *tree.workers()]
        for pid in pids:  # hold the first run still while the others try (it keeps its lock)
            os.kill(pid, signal.SIGSTOP)
        try:
            capfd.readouterr()
            started = time.monotonic()
            assert cli.main(["export-predictions", *args]) == 2  # one process
            assert time.monotonic() - started < 10
            err = capfd.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert err.startswith(f"yolozu-ttt export-predictions: {out} is being written by another export "
                                  f"(pid {holder['pid']} on {holder['host']}")
            assert "wait for it to finish, or stop it and rerun with --resume" in err
            assert fast_backend_calls == []  # refused before any work
            second = subprocess.run(_torchrun_cmd(args), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                    timeout=120)  # under torchrun
            assert second.returncode != 0
            assert f"{out} is being written by another export (pid {holder['pid']}" in second.stderr
            assert "export (2 workers)" not in second.stderr  # no progress bar: nothing was started
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert tree.wait(120) == 0, tree.stderr()[-4000:]
    finally:
        tree.close()
    _assert_same_file(out, uninterrupted)  # the first run's file, untouched by the others
    assert not lock.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out: Path, **fields) -> Path:
    lock = Path(str(out) + ".lock")
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
            "token": "t" * 32, "run_id": None, "attempt": 0, "output": str(out)}
    info.update(fields)
    lock.write_text(json.dumps(info))
    return lock


@pytest.mark.parametrize("stale", ["dead-pid", "old-heartbeat"])
def test_stale_lock_is_taken_over(data, single, tmp_path, capfd, stale):
    out = tmp_path / "out.json"
    if stale == "dead-pid":
        lock = _write_lock(out, pid=_dead_pid())
        reason = "is gone"
    else:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # alive, but silent
        lock = _write_lock(out, pid=sleeper.pid, heartbeat=time.time() - export.LOCK_STALE_S - 5)
        reason = f"no heartbeat for {export.LOCK_STALE_S + 5:.0f} s"
    try:
        _single([*_args(data, reset=None, n=N_SAMPLE), "--output", str(out)])
    finally:
        if stale != "dead-pid":
            sleeper.kill()
            sleeper.wait()
    err = capfd.readouterr().err
    assert f"taking over the stale lock {lock}" in err and reason in err, err
    assert _unmeasured(json.loads(out.read_text())) == _unmeasured(single["none"])
    assert not lock.exists()


def test_live_lock_refuses_one_process_with_exit_2(data, tmp_path, capfd):
    out = tmp_path / "out.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _write_lock(out, pid=sleeper.pid)
        for extra in ([], ["--resume"]):
            capfd.readouterr()
            assert cli.main(["export-predictions", *_args(data, reset=None, n=2), "--output", str(out), *extra]) == 2
            err = capfd.readouterr().err
            assert err.count("\n") == 1 and f"(pid {sleeper.pid} on {socket.gethostname()}" in err, err
        assert lock.exists() and not out.exists() and not Path(str(out) + ".parts").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_elastic_restart_continues_from_the_part_files(data, uninterrupted, tmp_path):
    """--max-restarts 1, rank 1 SIGKILLed when its third adaptation starts: torchrun restarts the
    group, which continues without --resume; every image is adapted to the end exactly once."""
    out, log = tmp_path / "out.json", tmp_path / "adapt.jsonl"
    env = dict(_env(), YTTT_ADAPT_LOG=str(log), YTTT_KILL_AT="1:3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(HELPER), "export-predictions",
           *_args(data, reset="sample", n=N_SAMPLE), "--output", str(out)]
    tree = _Tree(cmd, tmp_path, env)
    try:
        status = tree.wait(120)
    finally:
        err = tree.close()
    assert status == 0, err[-4000:]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    ended = [e["image"] for e in events if e["kind"] == "end"]
    images = [e["image"] for e in json.loads(uninterrupted)["predictions"]]
    assert sorted(ended) == sorted(images)  # every image adapted to the end exactly once
    killed = [e for e in events if e["kind"] == "start" and e["rank"] == 1 and e["attempt"] == 0]
    assert len(killed) == 3 and killed[-1]["image"] not in [e["image"] for e in events
                                                             if e["kind"] == "end" and e["attempt"] == 0]
    assert {e["attempt"] for e in events} == {0, 1}  # the restart did the rest
    _assert_same_file(out, uninterrupted)
    assert not Path(str(out) + ".parts").exists() and not Path(str(out) + ".lock").exists()


def test_progress_counts_unique_images_on_a_resumed_run(data, killed, tmp_path, capfd):
    """Lines written twice for one image (an old worker still appending to its part file) do not
    move the bar: it counts unique finished images and never passes the total."""
    out = tmp_path / "out.json"
    parts = _copy_parts(killed, out)
    old = sorted(parts.glob("part-*.jsonl"))[0]
    lines = old.read_bytes().split(b"\n")[1:]
    stop = threading.Event()

    def old_worker():
        while not stop.wait(0.2):
            with open(old, "ab") as handle:
                handle.write(b"\n".join(line for line in lines if line.strip()) + b"\n")

    writer = threading.Thread(target=old_worker, daemon=True)
    writer.start()
    try:
        _single([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out), "--resume"])
    finally:
        stop.set()
        writer.join()
    err = capfd.readouterr().err
    # tqdm shows "N/8 [" while N <= 8, and drops the total ("14img [") once N passes it
    counts = [(int(n), int(total) if total else None) for n, total in re.findall(r"(\d+)(?:/(\d+) |img )\[", err)]
    assert counts and all(total == N_SAMPLE for _, total in counts), err[-3000:]
    assert max(n for n, _ in counts) == N_SAMPLE and counts[-1][0] == N_SAMPLE, err[-3000:]
    assert counts[0][0] == len(killed["done"])  # resumed images counted from the start


# ---------------------------------------------------------------------------------------
# --ttt-parallel K: K-groups inside each rank's shard
# ---------------------------------------------------------------------------------------
def _helper_cmd(args: list[str], nproc: int | None = None) -> list[str]:
    """``yolozu-ttt`` through tests/support_export.py (adaptations logged), under torchrun with ``nproc``."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, *launcher, str(HELPER), "export-predictions", *args]


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_two_workers_adapt_k_at_once_within_their_shards(data, single, tmp_path):
    """torchrun, 2 workers, --ttt-parallel 2: each rank's shard of 4 is its first image alone, a
    group of 2 (predicted from the group's batched forward) and a last image alone; the merged
    file is one process's K = 1 export within tolerance, recording K."""
    out, log = tmp_path / "out.json", tmp_path / "adapt.jsonl"
    res = subprocess.run(_helper_cmd([*_args(data, reset="sample", n=N_SAMPLE), "--ttt-parallel", "2",
                                      "--output", str(out)], nproc=2),
                         cwd=tmp_path, env=dict(_env(), YTTT_ADAPT_LOG=str(log)), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    images = [e["image"] for e in single["sample-fast"]["predictions"]]
    ends = {e["image"]: e for e in _events(log) if e["kind"] == "end"}
    assert sorted(ends) == sorted(images)
    assert [ends[image]["rank"] for image in images] == [0] * 4 + [1] * 4
    assert [ends[image]["answered"] for image in images] == [False, True, True, False] * 2
    merged, one = json.loads(out.read_text()), single["sample-fast"]
    assert max_prediction_diff(one["predictions"], merged["predictions"]) <= TOL
    _assert_reports_close(one["meta"]["ttt"]["report"], merged["meta"]["ttt"]["report"])
    assert merged["meta"]["ttt"]["parallel"] == 2 and merged["meta"]["ttt"]["engine"]["parallel"] == 2
    assert f"{N_SAMPLE} images, 2 worker(s), gloo: {N_SAMPLE} computed, 0 from part files" in res.stderr


def test_kill_mid_group_then_resume_redoes_only_the_unfinished_images(data, single, tmp_path, fast_backend_calls):
    """--ttt-parallel 2 with --resume, SIGKILLed when YOLOZU asks for the second image of the first
    group (adapted with the first, not yet written): the part file holds the images before it;
    --resume adapts the others only and gives one process's K = 1 export."""
    out, log = tmp_path / "out.json", tmp_path / "adapt.jsonl"
    args = [*_args(data, reset="sample", n=N_SAMPLE), "--ttt-parallel", "2", "--output", str(out), "--resume"]
    res = subprocess.run(_helper_cmd(args), cwd=tmp_path, env=dict(_env(), YTTT_ADAPT_LOG=str(log), YTTT_KILL_AT="0:3"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-4000:]
    images = [e["image"] for e in single["sample-fast"]["predictions"]]
    assert [(e["kind"], e["image"], e.get("answered")) for e in _events(log)] == [
        ("start", images[0], None), ("end", images[0], False),  # alone
        ("start", images[1], None), ("end", images[1], True),  # the group [1, 2], adapted at once
        ("start", images[2], None)]
    assert sorted(_entries(Path(str(out) + ".parts"))) == [0, 1] and not out.exists()

    _single(args)
    assert [r["image"] for records in fast_backend_calls for r in records] == images[2:]
    merged, one = json.loads(out.read_text()), single["sample-fast"]
    assert max_prediction_diff(one["predictions"], merged["predictions"]) <= TOL
    _assert_reports_close(one["meta"]["ttt"]["report"], merged["meta"]["ttt"]["report"])
    assert not Path(str(out) + ".parts").exists()


# ---------------------------------------------------------------------------------------
# a full disk, Ctrl-C, SIGTERM: the earlier output kept, one line, finished work resumable
# ---------------------------------------------------------------------------------------
EARLIER_OUT, EARLIER_LOG = b'{"earlier": "output"}\n', b'{"earlier": "log"}\n'
N_FAULT = 4
LINE = "yolozu-ttt export-predictions: "


def _earlier(root: Path) -> tuple[Path, Path]:
    """An earlier export's output and TTT log, in place before the run that fails."""
    out, log = root / "out.json", root / "log.json"
    out.write_bytes(EARLIER_OUT)
    log.write_bytes(EARLIER_LOG)
    return out, log


def _fault_args(data, reset: str | None, out: Path, log: Path, resume: bool) -> list[str]:
    return [*_args(data, reset=reset, n=N_FAULT), "--output", str(out), "--ttt-log-out", str(log),
            *(["--resume"] if resume else [])]


def _assert_kept(out: Path, log: Path, err: str, ttt: bool = True) -> str:
    """The earlier files byte-identical, nothing of ours beside them, and the run's one line (no
    traceback), which names what was kept (the log is the run's only with --ttt): returned."""
    assert out.read_bytes() == EARLIER_OUT and log.read_bytes() == EARLIER_LOG
    assert not [p.name for p in out.parent.iterdir() if re.search(r"\.(tmp|kept)-\d+$", p.name)]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    ours = [line for line in re.split(r"[\r\n]", err) if line.startswith(LINE)]
    assert len(ours) == 1, err[-3000:]
    kept = f"the earlier {out}, {log} are kept unchanged" if ttt else f"the earlier {out} is kept unchanged"
    assert kept in ours[0], ours[0]
    return ours[0]


def _full_part_files(monkeypatch, out: Path) -> None:
    """The part files' disk is full once the third image's line is synced (every line is)."""
    import errno

    monkeypatch.setattr(export.parts, "FSYNC_EVERY_S", 0.0)
    real, synced = os.fsync, [0]

    def fsync(fd):
        if f"/{out.name}.parts/part-" in os.readlink(f"/proc/self/fd/{fd}"):
            synced[0] += 1
            if synced[0] == 4:  # the header, two images, then the third image's line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("mode, reset, full", [
    ("one-process", None, "out.json"),     # no --ttt: YOLOZU's own write of the output
    ("one-process", "sample", "log.json"),  # --ttt: the TTT log's write (after the output's)
    ("resume", "stream", "out.json"),      # the merge's write of the output
    ("resume", "sample", "part"),          # the part writer's own write
])
def test_a_full_disk_keeps_the_earlier_output_and_ends_in_one_line(data, tmp_path, monkeypatch, capsys, mode, reset,
                                                                   full):
    """A write error (ENOSPC, injected) while the run writes: exit 1, one line naming the path and
    what was kept, the earlier output and log byte-identical, no temporary file left; the rerun
    after freeing space completes (with part files, from them) and removes what a killed run left
    beside the output."""
    out, log = _earlier(tmp_path)
    args = _fault_args(data, reset, out, log, resume=mode == "resume")
    with monkeypatch.context() as patch:
        if full == "part":
            _full_part_files(patch, out)
        else:
            patch.setattr(Path, "write_text", support_export.disk_full(full))
        capsys.readouterr()
        assert cli.main(["export-predictions", *args]) == 1
    line = _assert_kept(out, log, capsys.readouterr().err, ttt=reset is not None)
    target = Path(str(out) + ".parts") if full == "part" else tmp_path / full
    assert re.match(rf"{LINE}cannot write {re.escape(str(target))}\S*: \[Errno 28\] No space left on device; ", line), line
    parts = Path(str(out) + ".parts")
    done = 0 if mode == "one-process" else len(_entries(parts))
    if mode == "one-process":
        assert not parts.exists()
    else:
        assert f"the images finished so far stay in {parts}: rerun with --resume" in line
        assert done == (3 if full == "part" else N_FAULT)
    (tmp_path / f".{out.name}.kept-{_dead_pid()}").write_bytes(EARLIER_OUT)  # what an older release left
    (tmp_path / f".{out.name}.tmp-{_dead_pid()}").write_bytes(EARLIER_OUT[:5])  # what a SIGKILL leaves
    capsys.readouterr()
    assert cli.main(["export-predictions", *args]) == 0
    if mode == "resume":
        assert f"{N_FAULT - done} computed, {done} from part files" in capsys.readouterr().err
    merged = json.loads(out.read_text())
    assert len(merged["predictions"]) == N_FAULT
    if reset is not None:
        assert merged["meta"]["ttt"]["engine"]["engine"] == "fast"  # what adapted (part files, stream state)
        assert json.loads(log.read_text())["output"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.json", "out.json"]


def test_the_one_line_is_one_write(data, tmp_path, monkeypatch):
    """Under torchrun every worker writes to the launcher's stderr, unbuffered (``python -u``):
    the one line a fault ends in goes out in one write, text and newline together, so two workers'
    lines never run together on one line (seen with print: "...rerun with --resumeyolozu-ttt ...")."""
    out, log = _earlier(tmp_path)
    args = _fault_args(data, None, out, log, resume=False)
    writes: list[str] = []

    class Unbuffered(io.TextIOBase):  # what -u makes of stderr: each write goes out as it is
        def write(self, text):
            writes.append(text)
            return len(text)

    monkeypatch.setattr(Path, "write_text", support_export.disk_full("out.json"))
    monkeypatch.setattr(sys, "stderr", Unbuffered())
    assert cli.main(["export-predictions", *args]) == 1
    lines = [w for w in writes if w.startswith(LINE)]
    assert len(lines) == 1 and lines[0].endswith("\n") and lines[0].count("\n") == 1, writes[-5:]
    assert out.read_bytes() == EARLIER_OUT


@pytest.mark.parametrize("mode, reset, sig", [
    ("one-process", None, "SIGINT"),
    ("one-process", "sample", "SIGTERM"),
    ("resume", "sample", "SIGINT"),
    ("resume", "stream", "SIGTERM"),
])
def test_ctrl_c_and_sigterm_keep_the_earlier_output_and_end_in_one_line(data, tmp_path, mode, reset, sig):
    """SIGINT / SIGTERM sent when YOLOZU's predict is called the second time (without --ttt, in one
    process, the first and only time): exit 130 / 143, one line saying what was kept and how to
    continue, the earlier output and log byte-identical, no temporary file; with --resume the
    finished images are in the part files and a rerun continues them."""
    out, log = _earlier(tmp_path)
    args = _fault_args(data, reset, out, log, resume=mode == "resume")
    at = 1 if reset is None else 2
    res = subprocess.run(_helper_cmd(args), cwd=tmp_path, env=dict(_env(), YTTT_SIGNAL_AT=f"{sig}:{at}"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == (130 if sig == "SIGINT" else 143), res.stderr[-4000:]
    line = _assert_kept(out, log, res.stderr, ttt=reset is not None)
    how = "Ctrl-C (SIGINT)" if sig == "SIGINT" else "SIGTERM"
    assert f"stopped by {how}; " in line, line
    parts = Path(str(out) + ".parts")
    if mode == "one-process":
        assert "nothing finished is kept without --resume" in line and not parts.exists()
        return
    assert f"the images finished so far stay in {parts}: rerun with --resume" in line
    done = len(_entries(parts))
    # SIGINT stops at once (the first image is kept); SIGTERM comes while the second batch of 2 is
    # in hand, which is written first (--infer-batch-size 2: all 4 images)
    assert done == {"SIGINT": 1, "SIGTERM": 4}[sig]
    res = subprocess.run(_helper_cmd(args), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"{N_FAULT - done} computed, {done} from part files" in res.stderr
    assert len(json.loads(out.read_text())["predictions"]) == N_FAULT


def _no_traceback_of_ours(err: str) -> None:
    assert not re.search(r'File ".*(yolozu_ttt|yolozu)/', err) and "KeyboardInterrupt" not in err, err[-4000:]


def test_torchrun_full_disk_at_the_merge_keeps_the_earlier_output(data, single, tmp_path):
    """torchrun, 2 workers, rank 0's disk full when YOLOZU's main writes the merged output: the
    earlier output byte-identical, rank 0's one line, no traceback of ours; --resume in one process
    then publishes from the part files without computing anything."""
    out, log = _earlier(tmp_path)
    args = _fault_args(data, "sample", out, log, resume=False)
    res = subprocess.run(_helper_cmd(args, nproc=2), cwd=tmp_path, env=dict(_env(), YTTT_DISK_FULL="out.json"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    _no_traceback_of_ours(res.stderr)
    assert out.read_bytes() == EARLIER_OUT and log.read_bytes() == EARLIER_LOG
    assert re.search(rf"{LINE}cannot write {re.escape(str(out))}: \[Errno 28\] No space left on device; the earlier "
                     rf"{re.escape(str(out))}, {re.escape(str(log))} are kept unchanged; the images finished so far "
                     rf"stay in {re.escape(str(out))}.parts: rerun with --resume", res.stderr), res.stderr[-4000:]
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert cli.main(["export-predictions", *args, "--resume"]) == 0
    merged = json.loads(out.read_text())
    assert max_prediction_diff(single["sample-fast"]["predictions"][:N_FAULT], merged["predictions"]) <= TOL


def test_torchrun_sigterm_keeps_the_earlier_output_and_resumes(data, tmp_path):
    """torchrun, 2 workers, the launcher sent SIGTERM mid-run (a scheduler stopping the job): every
    worker ends in one line with exit 143 and no traceback of ours; the earlier output stays
    byte-identical and --resume finishes from the part files."""
    out, log = _earlier(tmp_path)
    parts = Path(str(out) + ".parts")
    args = _fault_args(data, "sample", out, log, resume=False)
    tree = _Tree(_torchrun_cmd(args), tmp_path, support_export.held_env(_env(), tmp_path, at=2))
    try:  # every worker holds at its second image (its first written) until the signal reaches it
        assert support_export.wait_until(lambda: len(list(tmp_path.glob("held-*"))) == 2, 120)
        workers = tree.workers()
        os.kill(tree.proc.pid, signal.SIGTERM)
        status = tree.wait(60)
    finally:
        err = tree.close()
    assert status is not None and status != 0, err[-4000:]
    _no_traceback_of_ours(err)
    assert len(workers) >= 2
    assert len(re.findall(rf"{LINE}rank [01] of 2 stopped by SIGTERM .*; the earlier {re.escape(str(out))}, "
                          rf"{re.escape(str(log))} are kept unchanged; the images finished so far stay in ", err)) == 2, \
        err[-4000:]
    assert out.read_bytes() == EARLIER_OUT and log.read_bytes() == EARLIER_LOG
    done = len(_entries(parts))
    assert done == N_FAULT  # each rank's two: the first, and the one in hand when the signal came
    assert cli.main(["export-predictions", *args, "--resume"]) == 0
    assert len(json.loads(out.read_text())["predictions"]) == N_FAULT


def _launcher_cmd(args: list[str], nproc: int = 2) -> list[str]:
    """Our launcher (``yolozu-ttt torchrun``) of a ``nproc``-worker export."""
    return [sys.executable, "-m", "yolozu_ttt", "torchrun", "--standalone", "--nproc-per-node", str(nproc),
            "export-predictions", *args]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_launcher_stopped_mid_run_ends_in_one_line_and_resumes(data, tmp_path, sig):
    """``yolozu-ttt torchrun``, 2 workers, Ctrl-C (or SIGTERM) to the launcher mid-run: each worker
    ends in its own line, the launcher in one more and exit 130 (143), no traceback anywhere; the
    earlier output stays byte-identical, the part files stay and a --resume rerun through the
    launcher finishes."""
    out, log = _earlier(tmp_path)
    parts = Path(str(out) + ".parts")
    args = [*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out), "--ttt-log-out", str(log)]
    tree = _Tree(_launcher_cmd(args), tmp_path, support_export.held_env(_env(), tmp_path, at=2))
    try:  # every worker holds at its second image (its first written) until the signal reaches it
        assert support_export.wait_until(lambda: len(list(tmp_path.glob("held-*"))) == 2, 120)
        assert len(tree.workers()) >= 2
        os.kill(tree.proc.pid, sig)
        status = tree.wait(60)
    finally:
        err = tree.close()
    assert status == 128 + int(sig), err[-4000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-4000:]
    assert "death signal" not in err and "closing signal" not in err, err[-4000:]  # torch's notes: ours say it
    how = "Ctrl-C \\(SIGINT\\)" if sig == signal.SIGINT else "SIGTERM"
    assert len(re.findall(rf"{LINE}rank [01] of 2 stopped by {how}[^;]*; the earlier {re.escape(str(out))}, "
                          rf"{re.escape(str(log))} are kept unchanged; the images finished so far stay in ", err)) == 2, \
        err[-4000:]
    assert len(re.findall(rf"^yolozu-ttt torchrun: stopped by {how}; .* --resume", err, re.M)) == 1, err[-4000:]
    assert out.read_bytes() == EARLIER_OUT and log.read_bytes() == EARLIER_LOG
    done = len(_entries(parts))
    # each rank's first image; the one in hand when the signal came is finished under SIGTERM (a
    # stop honoured once the image is written), dropped under Ctrl-C
    assert done == (4 if sig == signal.SIGTERM else 2)
    res = subprocess.run(_launcher_cmd([*args, "--resume"]), cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"{N_SAMPLE - done} computed, {done} from part files" in res.stderr, res.stderr[-4000:]
    assert len(json.loads(out.read_text())["predictions"]) == N_SAMPLE and not parts.exists()


def test_launcher_ends_a_failed_run_in_the_workers_lines_and_one_more(data, tmp_path):
    """``yolozu-ttt torchrun``, 2 workers that both fail (a usage error: --ttt-parallel 0): each
    worker's own line, the launcher's one line naming the first failure (and how many failed:
    torch's agent stops the other worker once one failed, so it counts one or two), its exit
    status, no traceback."""
    args = [*_args(data, reset="sample", n=2), "--output", str(tmp_path / "out.json"), "--ttt-parallel", "0"]
    res = subprocess.run(_launcher_cmd(args), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-4000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr[-4000:]
    assert len(re.findall(r"^yolozu-ttt export-predictions: error: .*--ttt-parallel", res.stderr, re.M)) == 2, \
        res.stderr[-4000:]
    assert len(re.findall(r"^yolozu-ttt torchrun: worker rank [01] ended with exit status 2( \(2 workers failed\))?; "
                          r"its own line above says why$", res.stderr, re.M)) == 1, res.stderr[-4000:]
    assert not (tmp_path / "out.json").exists()


def test_launcher_usage(capsys):
    """``yolozu-ttt torchrun``: its help shows torch's launcher options; no command, or an option
    that would choose the workers' command, is a usage error (exit 2) before anything starts."""
    assert cli.main(["torchrun", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: yolozu-ttt torchrun [TORCHRUN OPTIONS] export-predictions") and "--nproc-per-node" in out
    assert cli.main(["torchrun", "--standalone", "--nproc-per-node", "2"]) == 2
    assert "yolozu-ttt torchrun: error: the command is missing" in capsys.readouterr().err
    for chosen in (["-m", "other"], ["--no-python"], ["--run-path"]):
        assert cli.main(["torchrun", *chosen, "export-predictions", "--help"]) == 2
        assert f"yolozu-ttt torchrun: error: {chosen[0]} is not an option here" in capsys.readouterr().err
