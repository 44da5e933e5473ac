"""``lowbit train --nproc N``, the launcher: a signal it receives stops every rank and is
recorded; a usage error only the data shows is one line and status 2; a failed rank is
named as the cause; ``WORLD_SIZE=1`` in the environment is a single process.

Each multi-process test runs one real torchrun job (a few seconds alone; the CPUs are
shared), bounded by :data:`TIMEOUT`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _kill_rank import CONFIG

from lowbit.experiments import train as train_cli

HERE = Path(__file__).parent
TIMEOUT = 120  # seconds for one torchrun job to start, or to end
STOP_WITHIN = 45  # seconds for every rank to end after the launcher's signal (torchrun
# itself waits 30 s for a rank before SIGKILLing it)
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _children() -> dict[int, list[int]]:
    """Every live process's children, from /proc (ppid is the 4th field of stat)."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z":
                out.setdefault(int(fields[1]), []).append(int(entry.name))
    return out


def _descendants(pid: int) -> set[int]:
    children, todo, seen = _children(), [pid], set()
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_every_rank_and_is_recorded(tmp_path, signum):
    """A review: SIGTERM to `lowbit train --nproc 2` killed the launcher alone (torchrun
    re-parented, the ranks trained on to "done"); SIGINT made subprocess.call SIGKILL
    torchrun, orphaning the ranks. The launcher now passes the signal on and waits."""
    run = tmp_path / "run"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items() if k != "epochs"]
    with open(tmp_path / "stderr.txt", "w") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "lowbit", "train", "--nproc=2", *args, "--epochs=500",  # minutes
             "--no-progress", f"--out={run}"], env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + TIMEOUT
        while _status(run).get("status") != "running":
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.2)
        tree = _descendants(launcher.pid)  # torchrun and its 2 ranks
        assert len(tree) >= 3, tree
        launcher.send_signal(signum)
        code = launcher.wait(timeout=STOP_WITHIN)
        deadline = time.monotonic() + STOP_WITHIN
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in tree if _alive(p)], "ranks outlived the launcher"
        assert code == 128 + signum
        record = _status(run)
        assert record["status"] == "interrupted", record
        err = (tmp_path / "stderr.txt").read_text()
        said = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        assert err.count(f"lowbit train: {said}") == 1 and "Traceback" not in err, err[-3000:]
    finally:  # whatever failed: nothing of this job is left running
        for pid in [launcher.pid, *tree]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()


def test_a_usage_error_only_the_data_shows_is_one_line_and_status_2(tmp_path):
    """A review: `--subset 100000000` (checked against the dataset, so by the ranks) was
    printed by every rank, then by torchrun as a 42-line ChildFailedError traceback, exit 1."""
    done = subprocess.run(
        [sys.executable, "-m", "lowbit", "train", "--nproc=2", "--subset=100000000", "--epochs=1",
         "--no-progress", f"--out={tmp_path / 'run'}"],
        env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == ["lowbit train: error: --subset must be at most 1438, got 100000000"]
    assert not (tmp_path / "run").exists()


def test_a_failed_rank_is_recorded_as_the_cause(tmp_path):
    """A review: when rank 1 raised, status.json recorded rank 0's gloo "Connection
    closed by peer". The first rank to stop records its own error, before its
    connections close."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "_kill_rank.py"), str(tmp_path), "3", "raise"],  # epoch 1 of 3
        env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    record = _status(tmp_path)
    assert record["status"] == "failed", record
    assert record["message"].startswith("stopped by an error on rank 1: RuntimeError: "
                                        "simulated failure on rank 1"), record


def test_a_rank_killed_by_a_signal_is_named_in_status_json(tmp_path, capsys):
    """A rank SIGKILLed (the out-of-memory killer) records nothing; rank 0 recorded the
    connection it lost. The launcher reads torchrun's failures (launch.py writes them)
    and names the rank and the signal."""
    (tmp_path / "failures.json").write_text(json.dumps({
        "1": {"exitcode": -9, "pid": 11, "time": 100.0},  # first, and not torchrun's SIGTERM
        "0": {"exitcode": -15, "pid": 10, "time": 100.0}}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"status": "failed", "message": (
        "stopped by an error on rank 0: RuntimeError: Connection reset by peer; after fixing it, "
        "the same command with --resume continues from the last epoch checkpoint")}))
    assert train_cli.explain_ending(tmp_path, run, 1) == 1
    assert capsys.readouterr().err.startswith("lowbit train: rank 1 was killed by SIGKILL; then rank 0 "
                                              "was killed by SIGTERM")
    record = _status(run)
    assert record["status"] == "failed"
    assert record["message"].startswith("stopped because rank 1 was killed by SIGKILL; the other ranks "
                                        "then: stopped by an error on rank 0: RuntimeError: Connection "
                                        "reset by peer; the same command with --resume"), record
    # a run that ended on its own keeps its record
    (run / "status.json").write_text(json.dumps({"status": "done", "message": ""}))
    train_cli.explain_ending(tmp_path, run, 1)
    assert _status(run)["status"] == "done"
    # the ranks' usage errors: printed once each, status 2
    (tmp_path / "rank0.error").write_text("lowbit train: error: --subset must be at most 9\n")
    (tmp_path / "rank1.error").write_text("lowbit train: error: --subset must be at most 9\n")
    capsys.readouterr()
    assert train_cli.explain_ending(tmp_path, run, 1) == 2
    assert capsys.readouterr().err == "lowbit train: error: --subset must be at most 9\n"


def test_a_rank_stopped_by_sigterm_first_is_named_first(tmp_path, capsys):
    """A new user's trial (README fault kind 245): ``kill -TERM`` of rank 1 of a
    ``--nproc 2`` run: rank 1 recorded "stopped by SIGTERM on rank 1", rank 0 then exited
    1 on the closed connection, in the same second by torchrun's clock, and the launcher
    said "rank 0 exited with status 1; then rank 1 was terminated". The rank status.json
    names as the first to stop comes first; a SIGKILLed rank (which records nothing) still
    comes before it (the test above)."""
    (tmp_path / "failures.json").write_text(json.dumps({
        "0": {"exitcode": 1, "pid": 10, "time": 100.0},
        "1": {"exitcode": 143, "pid": 11, "time": 100.0}}))
    run = tmp_path / "run"
    run.mkdir()
    said = {"status": "interrupted", "message": "stopped by SIGTERM on rank 1; the same command with "
            "--resume (lowbit sweep: the same command) continues from the last epoch checkpoint"}
    (run / "status.json").write_text(json.dumps(said))
    assert train_cli.explain_ending(tmp_path, run, 1) == 1
    assert capsys.readouterr().err.startswith("lowbit train: rank 1 was terminated (SIGTERM); then rank 0 "
                                              "exited with status 1")
    assert _status(run) == said  # its own record stands
    # a record another run left (this launch failed before writing "running": a review):
    # older than the launch, not read; torchrun's order stands
    (tmp_path / "failures.json").write_text(json.dumps({
        "0": {"exitcode": 1, "pid": 10, "time": 100.0},
        "1": {"exitcode": 143, "pid": 11, "time": 101.0}}))
    (run / "status.json").write_text(json.dumps({"status": "failed", "message": (
        "stopped by an error on rank 1: RuntimeError: an earlier run's; after fixing it, ...")}))
    os.utime(run / "status.json", (1000.0, 1000.0))
    train_cli.explain_ending(tmp_path, run, 1, since=2000.0)
    assert capsys.readouterr().err.startswith("lowbit train: rank 0 exited with status 1; then rank 1")
    train_cli.explain_ending(tmp_path, run, 1, since=500.0)  # a record of this launch names rank 1
    assert capsys.readouterr().err.startswith("lowbit train: rank 1 was terminated (SIGTERM); then rank 0")


def test_world_size_1_in_the_environment_is_not_a_launch(tmp_path, monkeypatch, capsys):
    """A review: WORLD_SIZE=1 left in the environment made `--nproc 2` refuse with
    "--world-size is 2 but this process was not launched on several ranks" (no such
    option). One rank is not a launch: the ranks are started."""
    from lowbit.cli import main

    launched = []
    monkeypatch.setattr(train_cli, "_torchrun", lambda args, nproc, out: launched.append(nproc) or 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "--nproc", "2", "--malloc", "default", "--out", str(tmp_path / "run")]) == 0
    assert launched == [2]
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["train", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert "WORLD_SIZE must be an integer" in capsys.readouterr().err


@pytest.mark.parametrize("message, shown", [
    ("world_size is 2 but this process was not launched on several ranks: use torchrun or "
     "lowbit train --nproc", "--nproc is 2 but this process was not launched on several ranks"),
    ("batch_size (33) must be a multiple of world_size (2): it is the global batch",
     "--batch-size (33) must be a multiple of --nproc (2)"),
    ("model_kwargs must be a dict", "--model-arg must be a dict"),
    # a path holding the word is the user's own (a second review: /proc/--nproc_run)
    ("cannot create the run folder /proc/world_size_run: No such file or directory",
     "cannot create the run folder /proc/world_size_run: No such file or directory"),
    ("cannot create the run folder runs/world_size: Permission denied",
     "cannot create the run folder runs/world_size: Permission denied"),
])
def test_messages_name_the_options_of_the_command_line(message, shown):
    assert train_cli._as_option(message).startswith(shown)


def test_a_sweep_under_torchrun_trains_every_run_on_one_process_group(tmp_path):
    """A review: under torchrun each run of a sweep created and destroyed the default
    process group, and the next run's gloo rendezvous failed ("connectFullMesh failed")
    or hung, in about half the launches of a two-run sweep. The sweep now holds one group
    for its grid: both runs train (one launch here; the failure was intermittent)."""
    out = tmp_path / "sw"
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lowbit",
         "sweep", "--tasks", "digits", "--models", "mlp", "--recipes", "fp,qat-8", "--epochs", "1",
         "--subset", "64", "--eval-subset", "32", "--batch-size", "32", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert job.returncode == 0, job.stderr[-2000:]
    for recipe in ("fp", "qat-8"):
        assert _status(out / f"digits-mlp-{recipe}-n2-s0")["status"] == "done"


def test_an_error_on_one_rank_of_a_sweep_ends_the_job_instead_of_hanging(tmp_path):
    """A second review: with one process group for the grid, a sweep that went on past any
    run's error let rank 0 (its checkpoint write failed: a full disk) start the next run
    while rank 1 was still in the first run's collectives: the job hung. Under torchrun
    the sweep now goes on only past a refusal every rank raises alike; this ends the job."""
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "_sweep_fault.py"), "disk", str(tmp_path / "sw"), "fp,qat-8"],
                         capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert job.returncode != 0
    assert "No space left on device (simulated)" in job.stderr + job.stdout


def test_a_torchrun_sweep_resumes_a_partial_run_on_every_rank_alike(tmp_path):
    """A third review: under torchrun each rank read a run's state itself, racing rank 0's
    lock: rank 1 saw "busy", started anew the run rank 0 resumed, was refused ("already
    holds a checkpoint") and went on to the next run while rank 0 waited in this one's
    collectives: rerunning a killed sweep hung. Rank 0 now decides each run's state and
    sends it to every rank (rank 1 reads late here, after rank 0 took the lock)."""
    import shutil

    out = tmp_path / "sw"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    first = subprocess.run([*launch, "-m", "lowbit", "sweep", "--tasks", "digits", "--models", "mlp", "--recipes",
                            "qat-8", "--epochs", "2", "--subset", "128", "--eval-subset", "32", "--batch-size", "32",
                            "--out", str(out), "--no-progress"],
                           capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert first.returncode == 0, first.stderr[-2000:]
    # the grid's listing and each run's status once, not once per rank (a review)
    assert first.stdout.count("sweep: 1 runs") == 1 and first.stdout.count(": start") == 1, first.stdout
    run = out / "digits-mlp-qat-8-n2-s0"  # made partial: killed after its first epoch
    shutil.copy(run / "prev.pt", run / "last.pt")
    (run / "metrics.json").write_text(json.dumps(json.loads((run / "metrics.json").read_text())[:1]))
    (run / "status.json").write_text(json.dumps({"status": "interrupted", "message": ""}))
    again = subprocess.run([*launch, str(HERE / "_sweep_fault.py"), "slow", str(out), "qat-8,fp"],
                           capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and "failed" not in again.stdout
    for recipe in ("qat-8", "fp"):
        assert _status(out / f"digits-mlp-{recipe}-n2-s0")["status"] == "done"


def test_refused_runs_of_a_torchrun_sweep_leave_no_folder(tmp_path):
    """A fifth review: every rank made each run's folder, rank 0 alone removed one it had
    made; rank 1, done with the previous refused run first, made the next folder, and it
    was left holding only ``.lock`` (2 of 4 runs). Rank 0 alone makes them now."""
    out = tmp_path / "sw"
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lowbit",
         "sweep", "--tasks", "digits", "--models", "cnn", "--recipes", "fqt-bhq-4a", "--seeds", "0,1,2,3",
         "--backend", "int8", "--epochs", "1", "--subset", "64", "--eval-subset", "32", "--batch-size", "32",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert job.returncode == 1, job.stderr[-2000:]
    assert job.stdout.count("failed, backend='int8' cannot run these GEMMs") == 8  # 4 runs × 2 ranks
    assert not out.exists() or not any(out.iterdir()), sorted(map(str, out.rglob("*")))
