"""Command-line tests: ``lowbit train | sweep | report | demo``.

The SIGKILL test runs ``python -m lowbit.cli train`` in a subprocess, kills it as soon as
its first checkpoint exists, resumes it, and checks the final weights bitwise against an
uninterrupted run. Subprocesses run with one thread and ``LOWBIT_COMPILE=0`` (no
per-process kernel compilation): the subject here is the loop, not the kernels.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit import cli
from lowbit.config import recipe_families
from lowbit.experiments import report
from lowbit.experiments.runconfig import TIMING_FIELDS

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
ENV = dict(os.environ, PYTHONPATH=PYTHONPATH, LOWBIT_COMPILE="0", OMP_NUM_THREADS="1")
TINY = ["--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *args]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_lowbit(*args), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip



def test_resume_takes_the_settings_the_command_line_does_not_give(tmp_path, capsys):
    """``lowbit train --resume --out DIR`` continues DIR's run with the settings its
    config.json records (task, model, recipe, seed, epochs…), not the options' defaults,
    which named another run and were refused; options given on the line still count."""
    out = str(tmp_path / "run")
    first = ["train", "--task", "digits", "--model", "mlp", "--recipe", "fqt-psq-8", "--epochs", "1",
             "--subset", "128", "--eval-subset", "64", "--seed", "3", "--out", out, *TINY]
    assert cli.main(first) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", out, *TINY]) == 0
    err = capsys.readouterr().err
    assert "with the settings" in err and "recipe 'fqt-psq-8'" in err and "seed 3" in err, err
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1]
    # a setting given on the line is not replaced: another recipe is another run
    assert cli.main(["train", "--resume", "--out", out, "--rec", "qat-8", *TINY]) == 2
    assert "recipe ('fqt-psq-8', now 'qat-8')" in capsys.readouterr().err


def test_resume_reads_the_checkpoint_where_config_json_is_damaged_and_names_its_source(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "digits", "--model", "mlp", "--recipe", "qat-8", "--epochs", "1",
                     "--subset", "128", "--eval-subset", "64", "--seed", "5", "--out", str(out), *TINY]) == 0
    good = (out / "config.json").read_text()
    (out / "config.json").write_text('{"train": {"task": "digits",')  # damaged
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out), *TINY]) == 0
    assert "last.pt records: " in capsys.readouterr().err  # the checkpoint's train_config
    # a recorded value the code no longer takes: the error says where it was read
    config = json.loads(good)
    config["train"]["model_kwargs"] = {"depth": 3}
    (out / "config.json").write_text(json.dumps(config))
    assert cli.main(["train", "--resume", "--out", str(out), *TINY]) == 2
    assert "read from " + str(out / "config.json") in capsys.readouterr().err
    # a run of several ranks is resumed with --nproc, which the error names
    config["train"]["model_kwargs"] = {}
    config["train"]["world_size"] = 2
    (out / "config.json").write_text(json.dumps(config))
    assert cli.main(["train", "--resume", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert ("resume it on 2 ranks (lowbit train --nproc 2 ..., or torchrun --nproc-per-node 2 -m lowbit "
            "train ... without --nproc)") in err

# --------------------------------------------------------------------------- SIGKILL + resume


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    epochs = 20  # 8 steps each: long enough to be killed well before the end
    args = ["train", "--task", "digits", "--model", "mlp", "--recipe", "fqt-bhq-4",
            "--epochs", str(epochs), "--subset", "512", "--seed", "3", *TINY]  # fmt: skip
    killed_dir, ref_dir = tmp_path / "killed", tmp_path / "ref"

    proc = subprocess.Popen(_lowbit(*args, "--out", str(killed_dir)), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed_dir / "last.pt").exists():
        assert proc.poll() is None, "training exited before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    state = torch.load(killed_dir / "last.pt", weights_only=True)
    assert state["epoch"] < epochs, "the run finished before it was killed"

    resumed = _run(*args, "--out", str(killed_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    reference = _run(*args, "--out", str(ref_dir))
    assert reference.returncode == 0, reference.stderr

    a = torch.load(killed_dir / "last.pt", weights_only=True)
    b = torch.load(ref_dir / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == epochs * 8
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["rng"]["sr"].keys() == b["rng"]["sr"].keys()
    timing = TIMING_FIELDS
    rows_a, rows_b = (
        [{k: v for k, v in r.items() if k not in timing} for r in json.loads(p.read_text())]
        for p in (killed_dir / "metrics.json", ref_dir / "metrics.json")
    )
    assert rows_a == rows_b


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--task", "cifar"], "--task must be one of digits, fashion-mnist, text"),
        (["train", "--model", "vgg"], "--model for task 'digits' must be one of mlp, cnn"),
        (["train", "--recipe", "fqt-xyz-4"], "--recipe must be one of fp, qat-B, fqt-"),
        (["train", "--epochs", "0"], "--epochs must be a positive integer"),
        (["train", "--epochs", "two"], "--epochs must be an integer, got 'two'"),
        (["train", "--batch-size", "-3"], "--batch-size must be a positive integer"),
        (["train", "--lr", "nan"], "--lr must be finite"),
        (["train", "--lr", "0"], "--lr must be a finite number > 0"),
        (["train", "--recipe", "fqt-psq-8", "--grad-input-bits", "9"], "2..8"),
        (["train", "--grad-weight-bits", "4"], "--grad-weight-bits needs an fqt-* recipe"),
        (["train", "--recipe", "fqt-auto", "--grad-input-bits", "4"],
         "--grad-input-bits conflicts with the adaptive recipe 'fqt-auto'"),
        (["train", "--backend", "cuda"], "--backend must be one of auto, reference, int8"),
        (["train", "--weights", "fp8"], "--weights must be one of fp32, bf16-master, bf16, int8"),
        (["train", "--weights", "bf16", "--opt-state", "fp32"],
         "--opt-state with bf16 weights must be one of bf16, int8"),
        (["train", "--recipe", "fqt-psq-8", "--range-margin", "1.5"],
         "--range-margin needs an fqt-*-predicted recipe"),
        (["train", "--recipe", "fqt-psq-8-predicted", "--range-margin", "0.5"],
         "--range-margin must be a finite number ≥ 1"),
        (["train", "--steps-per-epoch", "5"], "text task only"),
        (["train", "--model-arg", "width"], "--model-arg must look like KEY=VALUE"),
        (["train", "--threads", "0"], "--threads must be an integer from 1 to this machine"),
        (["train", "--threads", "100000"], "--threads must be an integer from 1 to this machine"),
        (["train", "--task", "text", "--subset", "10"], "--subset must be at least 2600 bytes for the text task"),
        # the whole corpus is read: only a shorter block helps, not a larger --subset (a review)
        (["train", "--task", "text", "--model-arg", "block_size=100000000"],
         "use a block_size of at most"),
        (["train", "--task", "text", "--subset", str(10**11)], "--subset must be at most"),
        (["sweep", "--tasks", "digits,cifar"], "--tasks: unknown task 'cifar'"),
        (["sweep", "--seeds", "0,x"], "--seeds must be an integer"),
        # seeds outside [0, 2**63) would alias (fault kind 25): every command refuses them
        (["sweep", "--seeds", "0,-1"], "--seeds must be an integer in [0, 2**63), got '-1'"),
        (["train", "--seed", str(2**64)], f"--seed must be an integer in [0, 2**63), got '{2**64}'"),
        (["demo", "--seed", str(2**63)], f"--seed must be an integer in [0, 2**63), got '{2**63}'"),
        (["comm-variance", "--task", "digits", "--seed", str(2**64)],
         f"--seed must be an integer in [0, 2**63), got '{2**64}'"),
        (["sweep", "--recipes", "fp,qat-9"], "--recipes: unknown recipe 'qat-9'; allowed: fp, qat-B, "),
        (["demo", "--recipes", "fp,fqt-bhq-3"],
         f"--recipes: unknown recipe 'fqt-bhq-3'; allowed: {recipe_families()}"),
        (["report", "--runs", "/nonexistent"], "--runs must be a folder"),
        (["demo", "--epochs", "-1"], "--epochs must be a positive integer"),
        (["demo", "--model", "resnet"], "must be one of mlp, cnn"),
    ],
)
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, args, message):
    rc = cli.main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lowbit {args[0]}: error: ") and message in err, err


@pytest.mark.parametrize("args, option", [
    (["train", "--epochs", "1", "--out", ""], "--out"),
    (["demo", "--epochs", "1", "--out", " "], "--out"),
    (["sweep", "--recipes", "fp", "--out", ""], "--out"),
    (["comm-variance", "--task", "digits", "--out", ""], "--out"),
    (["report", "--runs", "", "--out", "x"], "--runs"),
])
def test_an_empty_path_is_refused_not_read_as_a_folder(tmp_path, capsys, monkeypatch, args, option):
    """A new user's trial: ``lowbit train --out ""`` (a shell variable expanded to nothing)
    trained into the default folder without a word; other commands read "" as the current
    folder. Refused in one line naming the option, before any work."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {option} must name a folder, got an empty string" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_lowbit_debug_0_is_off(tmp_path, capsys, monkeypatch):
    """``LOWBIT_DEBUG=0`` turned the traceback on (any non-empty value did)."""
    monkeypatch.setenv("LOWBIT_DEBUG", "0")
    assert cli.main(["train", "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_value_in_a_subprocess_has_no_traceback(tmp_path):
    """``python -m lowbit.cli`` (cli as ``__main__``) reports errors the same way."""
    proc = _run("train", "--epochs", "0", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lowbit train: error: --epochs must be a positive integer, got 0"
    assert not (tmp_path / "x").exists()  # nothing created before validation


MODEL_ARG_ERRORS = [  # issue 11.14: every model argument checked against its constructor
    (["--model", "mlp", "--model-arg", "hidden=-3"],
     "--model-arg hidden must be an integer ≥ 1 for model 'mlp', got -3"),
    (["--model", "cnn", "--model-arg", "width=0"],
     "--model-arg width must be an integer ≥ 1 for model 'cnn', got 0"),
    (["--model-arg", "num_classes=3"],
     "--model-arg num_classes must be 10 (the task's class count) for model 'mlp', got 3"),
    (["--model-arg", "num_classes=10.0"],
     "--model-arg num_classes must be 10 (the task's class count) for model 'mlp', got 10.0"),
    (["--model-arg", "foo=1"], "--model-arg foo is not an argument of model 'mlp'; allowed: hidden, num_classes"),
    (["--model-arg", "hidden=1.5"], "--model-arg hidden must be an integer ≥ 1 for model 'mlp', got 1.5"),
    (["--model-arg", "hidden=abc"], "--model-arg hidden must be an integer ≥ 1 for model 'mlp', got 'abc'"),
    # the name first (a new user's walkthrough: "n_layer must be a number" for an mlp that has none)
    (["--model-arg", "n_layer=abc"], "--model-arg n_layer is not an argument of model 'mlp'; allowed: hidden, num_classes"),
    (["--model-arg", "hidden=inf"], "--model-arg hidden must be an integer ≥ 1 for model 'mlp', got 'inf'"),
    (["--model-arg", "hidden=3", "--model-arg", "hidden=4"], "--model-arg hidden is given twice"),
    (["--task", "text", "--model-arg", "n_head=3"],
     "--model-arg n_embd (256) must be divisible by n_head (3) for model 'gpt'"),
    (["--task", "text", "--model-arg", "dropout=1"],
     "--model-arg dropout must be a number in [0, 1) for model 'gpt', got 1"),
    (["--task", "text", "--model-arg", "block_size=0"],
     "--model-arg block_size must be an integer ≥ 1 for model 'gpt', got 0"),
    (["--task", "text", "--model-arg", "vocab_size=100"],
     "--model-arg vocab_size must be 256 (byte-level: 256 symbols) for model 'gpt', got 100"),
    (["--task", "fashion-mnist", "--model-arg", "widths=16,8,32"],
     "--model-arg widths must be 3 non-decreasing integers ≥ 1, comma-separated (e.g. 16,32,64) "
     "for model 'preact-resnet20', got (16, 8, 32)"),
    (["--task", "fashion-mnist", "--model-arg", "widths=16,a"],
     "--model-arg widths must be 3 non-decreasing integers ≥ 1, comma-separated (e.g. 16,32,64) "
     "for model 'preact-resnet20', got '16,a'"),
    (["--task", "fashion-mnist", "--model-arg", "in_channels=3"],
     "--model-arg in_channels must be 1 (grayscale images) for model 'preact-resnet20', got 3"),
]


def _main(args: list[str], capsys) -> tuple[int, str]:
    """``lowbit ARGS`` in this process: exit status and stderr (argparse exits itself)."""
    try:
        rc = cli.main(args)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, message", MODEL_ARG_ERRORS)
def test_bad_model_args_exit_2_with_the_exact_line(tmp_path, capsys, args, message):
    sweep = [{"--task": "--tasks", "--model": "--models"}.get(a, a) for a in args]
    for command, argv in (("train", args), ("sweep", [*sweep, "--dry-run"])):
        rc, err = _main([command, *argv, "--out", str(tmp_path / "out")], capsys)  # sweep: same check
        assert (rc, err) == (2, f"lowbit {command}: error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_model_args_within_range_build_the_model():
    from lowbit.experiments.models import build_model, check_model_args

    assert check_model_args("text", "gpt", {"dropout": 0, "n_head": 2}) == {"dropout": 0.0, "n_head": 2}
    model = build_model("fashion-mnist", "preact-resnet20", widths=[4, 8, 8], num_classes=10)
    assert model.head.in_features == 8  # a config.json's list is accepted as the tuple
    with pytest.raises(ValueError, match="^model argument hidden must be an integer ≥ 1"):
        build_model("digits", "mlp", hidden=0)  # the library checks too, not only the CLI


def test_every_model_arg_is_a_constructor_parameter():
    import inspect

    from lowbit.experiments.models import _BUILDERS, MODEL_ARGS, PreActResNet

    for task, models in MODEL_ARGS.items():
        for name, allowed in models.items():
            builder = _BUILDERS[task][name]
            params = set(inspect.signature(PreActResNet if "preact" in name else builder).parameters)
            assert set(allowed) == params - {"self", "depth"}, (task, name)


def test_argparse_and_path_errors_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["train", "--epochs"], "lowbit train: error: argument --epochs: expected one argument"),
        (["train", "--bogus"], "lowbit train: error: unrecognized arguments: --bogus (see lowbit train --help)"),
        (["train", "--recipie", "fqt-bhq-4"],  # a new user's typo: named with the option meant
         "lowbit train: error: unrecognized arguments: --recipie (did you mean: --recipie → --recipe?)"),
        (["variance", "--batch-sise", "3"],  # named before argparse's "required" check (a review)
         "lowbit variance: error: unrecognized arguments: --batch-sise (did you mean: --batch-sise → --batch-size?)"),
        (["train", "--resume", "--out", str(tmp_path / "no-such-run")],
         f"lowbit train: error: --resume: {tmp_path / 'no-such-run'} does not exist, so there is no run to "
         "continue (check the folder's name, or drop --resume to start a new run there)"),
        (["variance"], "lowbit variance: error: the following arguments are required: --task, --out"),
        (["variance", "--task", "digits", "--out", str(tmp_path / "v"), "--batches", "x"],
         "lowbit variance: error: argument --batches: invalid int value: 'x'"),
        (["variance", "--task", "digits", "--out", str(a_file)],
         f"lowbit variance: error: --out must be a folder, but {a_file} is a file"),
        (["variance", "--task", "digits", "--out", str(tmp_path / "v"), "--seed", "-1"],
         "lowbit variance: error: --seed must be an integer in [0, 2**63), got '-1'"),
        (["coverage", "--task", "digits", "--seed", "-5"],
         "lowbit coverage: error: --seed must be an integer in [0, 2**63), got '-5'"),
        (["report", "--runs", str(tmp_path), "--out", str(a_file / "x")],
         f"lowbit report: error: --out: {a_file} is a file, cannot create {a_file / 'x'}"),
        (["train", "--subset", "100000", "--out", str(tmp_path / "t")],
         "lowbit train: error: --subset must be at most 1438, got 100000"),
        (["train", "--nproc", "0", "--out", str(tmp_path / "t")],
         "lowbit train: error: --nproc must be a positive integer, got 0"),
        (["comm-variance", "--task", "digits", "--out", str(tmp_path / "c"), "--subset", "0"],
         "lowbit comm-variance: error: --subset must be an integer ≥ 1, got '0'"),
    ]
    for args, line in cases:
        assert _main(args, capsys) == (2, line + "\n"), args
    rc, err = _main(["nosuch"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("lowbit: error: argument COMMAND: invalid choice: 'nosuch'")


@pytest.mark.parametrize("args, message", MODEL_ARG_ERRORS[:3] + [
    (["--epochs"], "argument --epochs: expected one argument")])
def test_bad_model_args_in_a_subprocess(tmp_path, args, message):
    """The issue's failing commands, as a user runs them: exit 2, exactly one line."""
    proc = _run("train", "--out", str(tmp_path / "x"), "--task", "digits", *args)
    assert proc.returncode == 2
    assert proc.stderr == f"lowbit train: error: {message}\n"
    assert not (tmp_path / "x").exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["train", "--out", str(tmp_path / "file")]) == 2
    assert "--out must be a folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- sweep + report


def test_sweep_skips_finished_runs_and_report_writes_tables(tmp_path, capsys):
    results, docs = tmp_path / "results", tmp_path / "docs"
    sweep = ["sweep", "--tasks", "digits", "--recipes", "fp,qat-8,fqt-psq-8,fqt-psq-4",
             "--seeds", "0,1", "--epochs", "2", "--subset", "128", "--eval-subset", "64",
             "--batch-size", "32", "--out", str(results), *TINY]  # fmt: skip
    assert cli.main(sweep) == 0
    names = sorted(p.name for p in results.iterdir())
    assert names == sorted(f"digits-mlp-{r}-s{s}" for r in ("fp", "qat-8", "fqt-psq-8", "fqt-psq-4")
                           for s in (0, 1))  # fmt: skip
    capsys.readouterr()
    assert cli.main(sweep) == 0  # everything done: nothing retrained
    assert capsys.readouterr().out.count("done, skipped") == 8
    # another length is another run: not extended (its schedule spans its own epochs)
    longer = [a if a != "2" or sweep[i - 1] != "--epochs" else "3" for i, a in enumerate(sweep)]
    assert cli.main(longer) == 1  # nothing of the asked settings trained: not a success
    out = capsys.readouterr().out
    assert "(8 other)" in out and out.count("its folder holds a run of other settings: epochs (2, now 3)") == 8
    assert all(json.loads((results / n / "metrics.json").read_text())[-1]["epoch"] == 2 for n in names)
    # so is any other setting (a review found runs of another lr reported "done, skipped")
    other_lr = [*sweep, "--lr", "0.001"]
    assert cli.main(other_lr) == 1
    out = capsys.readouterr().out
    assert "(8 other)" in out and "done, skipped" not in out and out.count("lr (") == 8

    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\nhand-written intro\n\n"
                                      f"{report.BEGIN}\nold\n{report.END}\n\nhand-written outro\n")  # fmt: skip
    assert cli.main(["report", "--runs", str(results), "--out", str(docs)]) == 0
    text = (docs / "results.md").read_text()
    assert "hand-written intro" in text and "hand-written outro" in text and "\nold\n" not in text
    section = text.split(report.BEGIN)[1].split(report.END)[0]
    assert "### digits — mlp" in section
    row = next(line for line in section.splitlines() if line.startswith("| qat-8 |"))
    assert "| 2 |" in row and "1.00×" in row and " ± " in row
    assert (docs / "figures" / "digits-mlp-curves.png").stat().st_size > 1000
    assert (docs / "figures" / "digits-mlp-bits.png").stat().st_size > 1000

    # low-precision weights and predicted ranges: rows of the same table, in order
    more = ["sweep", "--tasks", "digits", "--seeds", "0", "--epochs", "2", "--subset", "128",
            "--eval-subset", "64", "--batch-size", "32", "--out", str(results), *TINY]
    assert cli.main([*more, "--recipes", "fqt-psq-8", "--weights", "int8"]) == 0
    assert cli.main([*more, "--recipes", "fqt-psq-8", "--weights", "bf16-master"]) == 0
    assert cli.main([*more, "--recipes", "fqt-psq-8-predicted"]) == 0
    assert cli.main(["report", "--runs", str(results), "--out", str(docs)]) == 0
    text = (docs / "results.md").read_text()
    assert text.count("### digits — mlp") == 1  # same settings: one table
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| fqt-psq-8")]
    assert rows[:4] == ["| fqt-psq-8", "| fqt-psq-8, bf16-master weights + fp32 state",
                        "| fqt-psq-8, int8 weights + int8 state", "| fqt-psq-8-predicted margin 1.25"]
    # the bits figure compares gradient quantizers only: the seed-0 fqt-psq-8 point holds the
    # two dynamic float32 runs, not the low-precision or predicted ones
    points, _ = report.bits_points(report.load_runs(results), "accuracy")
    assert len(points["psq"][8]) == 2


def test_sweep_skips_a_run_another_process_is_training(tmp_path, capsys):
    """Two sweeps over one grid share it: a run whose folder another process holds is
    skipped, tried once more at the end, and named in the last line if still held; the
    others are trained; once it is free a later sweep trains it."""
    from test_trainer import hold_lock

    results = tmp_path / "results"
    sweep = ["sweep", "--tasks", "digits", "--recipes", "fp,qat-8", "--epochs", "1", "--subset",
             "128", "--eval-subset", "64", "--batch-size", "32", "--out", str(results), *TINY]
    held = results / "digits-mlp-qat-8-s0"
    holder = hold_lock(held)
    try:
        assert cli.main([*sweep, "--dry-run"]) == 0
        assert f"busy     {held}" in capsys.readouterr().out
        assert cli.main(sweep) == 1  # one run asked for was not trained: exit 1
        out = capsys.readouterr().out
        assert f"[2/2] digits-mlp-qat-8-s0: skipped for now, {held} is being trained by process " \
               f"{holder.pid}" in out
        assert "[again] digits-mlp-qat-8-s0: skipped for now" in out
        assert out.rstrip().endswith("sweep: 1 run(s) still held by another process, not finished "
                                     "by this sweep: digits-mlp-qat-8-s0")
        assert (results / "digits-mlp-fp-s0" / "metrics.json").exists()
        assert not (held / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(sweep) == 0  # the holder is gone, and so is its lock
    out = capsys.readouterr().out
    assert "digits-mlp-fp-s0: done, skipped" in out and "digits-mlp-qat-8-s0: start" in out
    assert json.loads((held / "status.json").read_text())["status"] == "done"


def test_sweep_grad_bits_name_runs_and_apply_to_fqt_only(tmp_path, capsys):
    args = ["sweep", "--recipes", "fp,fqt-bhq-8", "--grad-input-bits", "5", "--epochs", "1",
            "--out", str(tmp_path), "--dry-run"]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "digits-mlp-fp-s0" in out and "digits-mlp-fqt-bhq-8-gi5-gw8-s0" in out


def test_sweep_dry_run_exits_as_the_sweep_on_data_refusals_and_counts_a_seed_once(tmp_path, capsys):
    """A review: ``--dry-run`` listed runs the data refuses (an evaluation subset or a
    batch larger than the data) as new and exited 0 where the sweep exits 1; the sweep's
    line named the field (``eval_subset``) where ``lowbit train`` names the option; and
    ``--seeds 0,00,+0`` counted three runs of one seed."""
    base = ["sweep", "--recipes", "fp", "--epochs", "1", "--subset", "128", "--out", str(tmp_path)]
    assert cli.main([*base, "--eval-subset", "100000", "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "--eval-subset must be at most" in out, out
    assert cli.main([*base, "--batch-size", "200", "--dry-run"]) == 1
    assert "--batch-size (200) exceeds the 128 training images" in capsys.readouterr().out
    assert cli.main([*base, "--eval-subset", "100000"]) == 1  # the sweep itself: the same line
    assert "failed, --eval-subset must be at most" in capsys.readouterr().out
    assert cli.main([*base, "--seeds", "0,00,+0", "--dry-run"]) == 0
    assert "sweep: 1 runs" in capsys.readouterr().out
    # a second review: a folder holding another program's config.json was "new" to the dry run
    foreign = tmp_path / "digits-mlp-fp-s0"
    foreign.mkdir(exist_ok=True)
    (foreign / "config.json").write_text('{"name": "other-tool"}')
    assert cli.main([*base, "--dry-run"]) == 1
    assert "not a lowbit run's record" in capsys.readouterr().out
    assert cli.main(base) == 1  # the sweep: skipped as other settings, its file kept
    assert (foreign / "config.json").read_text() == '{"name": "other-tool"}'
    # the trainer's order: the data's refusal before the backend's
    assert cli.main([*base, "--models", "cnn", "--recipes", "fqt-psq-8", "--backend", "fp8", "--eval-subset",
                     "100000", "--dry-run"]) == 1
    assert "--eval-subset must be at most" in capsys.readouterr().out


def test_sweep_recipe_settings_go_to_the_recipes_they_fit(tmp_path, capsys):
    """``--range-margin`` over a mixed grid refused the whole sweep while
    ``--grad-input-bits`` was dropped from fp without a word: both now go to the recipes
    they fit, a line names the others, and a setting that fits no recipe is refused."""
    args = ["sweep", "--recipes", "fp,fqt-psq-8-predicted,fqt-auto-psq", "--grad-input-bits", "5",
            "--range-margin", "1.5", "--epochs", "1", "--out", str(tmp_path), "--dry-run"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "digits-mlp-fp-s0" in out and "digits-mlp-fqt-psq-8-predicted-gi5-gw8-m1.5-s0" in out
    assert "--grad-input-bits 5 is not used by fp, fqt-auto-psq" in out
    assert "--range-margin 1.5 is not used by fp, fqt-auto-psq" in out
    rc = cli.main(["sweep", "--recipes", "fp,qat-8", "--range-margin", "1.5", "--out",
                   str(tmp_path), "--dry-run"])
    assert rc == 2
    assert "--range-margin applies to none of --recipes" in capsys.readouterr().err
    # a trial: FP8 and block-format recipes have their own widths — the sweep aborted with
    # "gradient bits apply to integer formats", naming neither the recipe nor the option
    assert cli.main(["sweep", "--recipes", "fp,fqt-psq-8,fqt-psq-fp8,fqt-bhq-mxfp4", "--grad-input-bits", "5",
                     "--epochs", "1", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--grad-input-bits 5 is not used by fp, fqt-psq-fp8, fqt-bhq-mxfp4" in out
    assert "digits-mlp-fqt-psq-fp8-s0" in out and "digits-mlp-fqt-psq-8-gi5-gw8-s0" in out
    assert cli.main(["train", "--recipe", "fqt-psq-fp8", "--grad-input-bits", "5", "--out", str(tmp_path / "t")]) == 2
    assert "--grad-input-bits sets an integer width, and the grad_input format of recipe 'fqt-psq-fp8' is " \
        "'fp8_e5m2'" in capsys.readouterr().err
    # and a task's setting goes to that task's runs (--steps-per-epoch: text), not refused
    assert cli.main(["sweep", "--tasks", "digits,text", "--recipes", "fp", "--steps-per-epoch", "10",
                     "--epochs", "1", "--out", str(tmp_path / "st"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--steps-per-epoch 10 is not used by digits (it applies to the text task only)" in out
    assert cli.main(["sweep", "--tasks", "digits", "--recipes", "fp", "--steps-per-epoch", "10",
                     "--out", str(tmp_path / "st"), "--dry-run"]) == 2
    assert "--steps-per-epoch applies to the text task only, and --tasks is digits" in capsys.readouterr().err
    # a model's argument goes to that model's runs (a review: n_layer refused for the MLP)
    assert cli.main(["sweep", "--tasks", "digits,text", "--recipes", "fp", "--model-arg", "n_layer=2",
                     "--epochs", "1", "--out", str(tmp_path / "ma"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--model-arg n_layer=2 is not used by mlp (digits)" in out
    assert cli.main(["sweep", "--tasks", "digits,fashion-mnist", "--recipes", "fp", "--model-arg", "n_layer=2",
                     "--out", str(tmp_path / "ma"), "--dry-run"]) == 2
    assert ("--model-arg n_layer is an argument of none of the sweep's models: mlp (digits) takes hidden, "
            "num_classes; preact-resnet20 (fashion-mnist) takes") in capsys.readouterr().err


def test_report_refuses_a_results_md_that_is_a_folder_before_any_work(tmp_path, capsys):
    """A review: ``OUT/results.md`` a folder ended in ``IsADirectoryError``'s traceback,
    after the figures were drawn: one line, exit 2, nothing drawn."""
    runs = tmp_path / "runs"
    _fake_run(runs, "qat-8", 0, [0.5, 0.9], "done")
    (tmp_path / "out" / "results.md").mkdir(parents=True)
    assert cli.main(["report", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 2
    assert "--out's results.md must be a file, but" in capsys.readouterr().err
    assert not (tmp_path / "out" / "figures").exists()
    # a results.md of broken markers, or a file named figures: refused before anything is drawn
    (tmp_path / "out" / "results.md").rmdir()
    (tmp_path / "out" / "results.md").write_text("# x\n<!-- BEGIN lowbit report -->\nold\n")
    assert cli.main(["report", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 2
    assert "expected one of each" in capsys.readouterr().err and not (tmp_path / "out" / "figures").exists()
    (tmp_path / "out" / "results.md").unlink()
    (tmp_path / "out" / "figures").write_text("")
    assert cli.main(["report", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 2
    assert "--out's figures must be a folder" in capsys.readouterr().err


def test_report_creates_results_md_with_markers(tmp_path):
    body = "table"
    path = tmp_path / "results.md"
    report.write_section(path, body)
    report.write_section(path, "new table")
    text = path.read_text()
    assert text.startswith("# Results") and text.count(report.BEGIN) == 1
    assert "new table" in text and "\ntable\n" not in text


# --------------------------------------------------------------------------- demo


def test_demo_smoke(tmp_path):
    proc = _run("demo", "--model", "mlp", "--epochs", "1", "--recipes", "fp,fqt-bhq-4",
                "--out", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header + 2 recipes
    assert table[1].split("|")[4].strip() == "-"  # no gradient quantization in fp
    assert float(table[2].split("|")[4]) > 0  # FQT adds variance
    assert "Wall time" in proc.stdout


def test_demo_table_fits_long_recipe_names_and_marks_biased_gradients(tmp_path):
    """A new user's trial: recipe names past 10 characters pushed their rows out of the
    table's columns, and a round-to-nearest (biased) recipe's E‖g_FQT − g_QAT‖² was shown
    as variance without a word."""
    proc = _run("demo", "--model", "mlp", "--epochs", "1", "--recipes", "fp,fqt-hadamard-8,fp8-rowwise",
                "--out", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 5 and len({len(line) for line in table}) == 1  # one width, columns aligned
    assert len({tuple(i for i, ch in enumerate(line) if ch == "|") for line in table}) == 1
    assert table[3].index("e-") == table[4].index("e-")  # the values' digits aligned, marked or not
    assert table[4].split("|")[4].strip().endswith(" *") and not table[3].split("|")[4].strip().endswith("*")
    assert "*: round-to-nearest gradients (biased)" in proc.stdout


def _fake_run(root: Path, recipe: str, seed: int, finals: list[float], status: str,
              epochs: int = 2, data: str | None = None, task: str = "digits",
              **columns: list[float] | list[str]) -> None:
    """A run folder with ``finals`` as its per-epoch accuracy and ``columns`` (name → one
    value per epoch) added to the rows; ``data``: its ``config.json`` record of the data."""
    from lowbit.experiments.trainer import TrainConfig, write_metrics, write_status

    cfg = TrainConfig(task=task, recipe=recipe, seed=seed, epochs=epochs)
    run_dir = root / cfg.run_name()
    run_dir.mkdir(parents=True)
    config = {"train": cfg.to_dict(), "fqt": cfg.fqt_config().to_dict()}
    if data is not None:
        config["data"] = data
    (run_dir / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": i + 1, "accuracy": a, "step_time_ms": 10.0}
            | {k: v[i] for k, v in columns.items()} for i, a in enumerate(finals)]
    write_metrics(run_dir, rows)
    write_status(run_dir, status)


def test_bits_figure_keeps_other_formats_out_of_an_integer_point(tmp_path):
    """The "gradient bits" figure averaged FP8, MX, asymmetric-grid and round-to-nearest
    runs into the integer point of the same bits (Fashion's "PSQ 8 bits" was 7 runs of
    three recipes); only symmetric integer grids rounded stochastically count now."""
    runs = tmp_path / "runs"
    for recipe, final in (("fqt-psq-8", 0.9), ("fqt-psq-fp8", 0.5), ("fp8-rowwise", 0.4),
                          ("fqt-bhq-4", 0.8), ("fqt-bhq-4a", 0.3), ("fqt-bhq-mxfp4", 0.2)):
        _fake_run(runs, recipe, 0, [0.1, final], "done")
    points, _ = report.bits_points(report.load_runs(runs), "accuracy")
    assert {q: dict(b) for q, b in points.items()} == {"psq": {8: [0.9]}, "bhq": {4: [0.8]}}


def test_bits_figure_leaves_recipes_with_overridden_bits_out(tmp_path):
    """A review: ``fqt-psq-8`` with ``--grad-weight-bits 2`` (another recipe: its own table
    row) was averaged into the PSQ-8 point, each seed twice."""
    from lowbit.experiments.trainer import TrainConfig, write_metrics, write_status

    runs = tmp_path / "runs"
    _fake_run(runs, "fqt-psq-8", 0, [0.1, 0.9], "done")
    cfg = TrainConfig(task="digits", recipe="fqt-psq-8", seed=0, epochs=2, grad_weight_bits=2)
    run_dir = runs / cfg.run_name()
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "fqt": cfg.fqt_config().to_dict()}))
    write_metrics(run_dir, [{"epoch": 1, "accuracy": 0.1, "step_time_ms": 10.0},
                            {"epoch": 2, "accuracy": 0.5, "step_time_ms": 10.0}])
    write_status(run_dir, "done")
    loaded = report.load_runs(runs)
    assert len(loaded) == 2
    points, _ = report.bits_points(loaded, "accuracy")
    assert {q: dict(b) for q, b in points.items()} == {"psq": {8: [0.9]}}
    # quantized gradient averaging is another row too (a second review)
    comm = json.loads((run_dir / "config.json").read_text())
    comm["train"] |= {"grad_weight_bits": None, "grad_comm": "int4", "world_size": 2}
    (run_dir / "config.json").write_text(json.dumps(comm))
    points, _ = report.bits_points(report.load_runs(runs), "accuracy")
    assert {q: dict(b) for q, b in points.items()} == {"psq": {8: [0.9]}}


def test_a_cut_monitor_log_leaves_its_column_out_not_the_report(tmp_path, capsys):
    """A review: one truncated ``monitor.json`` (a crash mid-write) stopped the whole
    report with a JSON error naming no file; the other runs' figure is drawn."""
    from lowbit.experiments import monitoring

    runs = tmp_path / "runs"
    for recipe in ("fqt-psq-8", "fqt-bhq-4"):
        _fake_run(runs, recipe, 0, [0.1, 0.9], "done")
    loaded = report.load_runs(runs)
    (Path(loaded[0].path) / monitoring.LOG).write_text('{"history": [')
    assert monitoring.plot_ratios(loaded, tmp_path / "v.png") is False  # the only log is cut
    assert f"{Path(loaded[0].path) / monitoring.LOG} is not a readable monitor log" in capsys.readouterr().err


def test_cli_prints_lowbit_info_lines(tmp_path, capsys):
    """The README's "the run says why in one line" (a recipe with nothing to monitor) and
    adaptive decisions were ``logging.info`` calls nobody configured: Python dropped them."""
    assert cli.main(["train", "--task", "digits", "--recipe", "fp8-rowwise", "--epochs", "1", "--subset", "64",
                     "--eval-subset", "32", "--batch-size", "32", "--out", str(tmp_path / "r"), *TINY]) == 0
    err = capsys.readouterr().err
    assert "no layer can be monitored: round-to-nearest gradients" in err


def test_an_unreadable_folder_is_named_not_fatal(tmp_path, capsys):
    """One empty ``config.json`` (or a Hugging Face model's, without ``train``) below
    ``--runs`` stopped the whole report with "error: Expecting value" / "error: train",
    naming no file; it is now skipped with its folder named. ``lowbit sweep`` names a
    folder whose status or metrics it cannot read."""
    runs = tmp_path / "runs"
    _fake_run(runs, "fp", 0, [0.5, 0.9], "done")
    for name, text in (("empty", ""), ("hf-model", '{"model_type": "gpt2"}')):
        (runs / name).mkdir()
        (runs / name / "config.json").write_text(text)
        (runs / name / "metrics.json").write_text("[]")
    assert len(report.load_runs(runs)) == 1
    err = capsys.readouterr().err
    assert f"skipped {runs / 'empty'}: not a readable lowbit run" in err and "hf-model" in err
    out = runs / "digits-mlp-qat-8-s0"
    out.mkdir()
    (out / "status.json").write_text("")
    from lowbit.experiments.sweep import run_state
    from lowbit.experiments.trainer import TrainConfig
    with pytest.raises(ValueError, match=f"{out}: its status.json or metrics.json is not readable"):
        run_state(TrainConfig(task="digits", recipe="qat-8", epochs=2, out=str(out)))


def test_nproc_refuses_a_folder_before_launching_the_ranks(tmp_path, capsys, monkeypatch):
    """``train --nproc 2`` into a folder holding a checkpoint printed the refusal twice and
    ended in torchrun's traceback (exit 1): the folder is now checked before the launch,
    one line and exit 2, as every invalid command."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["train", "--task", "digits", "--recipe", "qat-8", "--epochs", "1", "--subset", "64",
            "--eval-subset", "32", "--batch-size", "32", "--out", str(tmp_path / "r"), *TINY]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main([*args, "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # (a run of 1 rank: --resume would be refused too, so the difference is named first)
    assert err == [f"lowbit train: error: {tmp_path / 'r'} already holds a checkpoint of a run with other "
                   "settings: --nproc (1, now 2). To train these settings, choose another --out; to continue "
                   "that run, pass --resume and leave those options out (they are read from "
                   f"{tmp_path / 'r' / 'config.json'})"]


def test_sweep_refuses_a_task_left_without_a_model(tmp_path, capsys):
    """``--tasks digits,text --models mlp`` dropped the text task without a word (its dry
    run listed one run): refused, naming the task and its models."""
    rc = cli.main(["sweep", "--tasks", "digits,text", "--models", "mlp", "--recipes", "fp",
                   "--out", str(tmp_path), "--dry-run"])
    assert rc == 2
    assert "--models: none of mlp is a model of task 'text'" in capsys.readouterr().err


def test_report_leaves_diverged_and_unfinished_runs_out_of_the_mean(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "qat-8", 0, [0.5, 0.9], "done")
    _fake_run(runs, "qat-8", 1, [0.5, 0.7], "done")
    _fake_run(runs, "fqt-ptq-4", 0, [0.2, 0.3], "done")
    _fake_run(runs, "fqt-ptq-4", 1, [0.1], "diverged")
    _fake_run(runs, "fqt-ptq-4", 2, [0.4], "running")
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    rows = {
        line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")
    }
    assert "| 80.00 ± 14.14 | 2 |" in rows["qat-8"]
    assert "| 30.00 | 1 |" in rows["fqt-ptq-4"]
    assert "1 diverged; 1 unfinished (epochs done: 1/2)" in rows["fqt-ptq-4"]


def test_report_wall_time_and_variance_ratio_columns(tmp_path):
    """Wall/run = the sum of the epochs' epoch_time_s (mean over seeds, minutes); the
    variance column = ratio_x_max / ratio_w_max in epochs 1, ⌊(n−1)/2⌋+1 and n, mean over
    seeds; runs without the columns show –."""
    runs = tmp_path / "runs"
    _fake_run(runs, "qat-8", 0, [0.5, 0.9], "done")  # recorded before epoch_time_s: –
    _fake_run(runs, "fqt-psq-4", 0, [0.2, 0.3, 0.4], "done", epochs=3,
              epoch_time_s=[60.0, 120.0, 180.0], ratio_x_max=[0.01, 0.02, 0.04],
              ratio_w_max=[0.1, 0.2, 0.3])
    _fake_run(runs, "fqt-psq-4", 1, [0.2, 0.3, 0.5], "done", epochs=3,
              epoch_time_s=[120.0, 120.0, 120.0], ratio_x_max=[0.03, 0.04, 0.06],
              ratio_w_max=[0.3, 0.4, 0.5])
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")]
            for line in section.splitlines() if line.startswith("| ")}
    header = rows["recipe"]
    wall, var = header.index("wall/run (min)"), header.index("variance ratio, epoch 1 → mid → last")
    assert rows["fqt-psq-4"][wall] == "6.0"  # (360 s + 360 s) / 2
    assert report._minutes([3.0]) == "0.050" and report._minutes([]) == "–"
    assert rows["fqt-psq-4"][var] == "∇X 0.02 → 0.03 → 0.05; ∇W 0.2 → 0.3 → 0.4"
    assert rows["qat-8"][wall] == "–" and rows["qat-8"][var] == "–"


def test_report_names_the_machines_that_trained_each_table(tmp_path):
    """One line per table: each CPU with its epochs and runs; epochs without the column
    are "not recorded" (trained before lowbit recorded the CPU), never assigned a guess."""
    runs = tmp_path / "runs"
    _fake_run(runs, "qat-8", 0, [0.5, 0.9, 0.9], "done", epochs=3)  # before the column
    _fake_run(runs, "fqt-psq-4", 0, [0.2, 0.3, 0.4], "done", epochs=3, cpu=["AMD", "AMD", "Intel"])
    _fake_run(runs, "fqt-psq-4", 1, [0.2], "running", epochs=3, cpu=["Intel"])
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    line = next(ln for ln in section.splitlines() if ln.startswith("Machines: "))
    assert line == ('Machines: AMD (2 epochs of 1 run); Intel (2 epochs of 2 runs); not recorded '
                    '(3 epochs of 1 run) ("not recorded": epochs trained before lowbit recorded '
                    'the CPU).')


def test_report_sections_are_independent(tmp_path):
    """Named sections keep their own markers and figure names; the unnamed one is kept."""
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    _fake_run(runs, "qat-8", 0, [0.5, 0.9], "done")
    docs.mkdir()
    (docs / "results.md").write_text(f"# Results\n\n{report.BEGIN}\nshort grid\n{report.END}\n")
    args = ["report", "--runs", str(runs), "--out", str(docs), "--section", "convergence"]
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # replaced, not appended twice
    text = (docs / "results.md").read_text()
    begin, end = report.markers("convergence")
    assert text.count(begin) == 1 and text.count(end) == 1 and "short grid" in text
    assert "--section convergence" in text.split(begin)[1]
    assert (docs / "figures" / "convergence-digits-mlp-curves.png").exists()
    for bad in ("a--b", "x>", "", " c", "-a", ".", "..", "_x"):
        with pytest.raises(ValueError, match="--section: a letter or digit"):
            report.markers(bad)


def test_report_removes_the_figures_its_section_no_longer_shows(tmp_path):
    """A trial: a report of other runs into the same --out left the earlier tables' figures
    (digits-cnn-*.png) beside a results.md that no longer showed them. The section's own
    earlier figures go; another section's, and files the report never wrote, stay."""
    runs_a, runs_b, docs = tmp_path / "a", tmp_path / "b", tmp_path / "docs"
    _fake_run(runs_a, "qat-8", 0, [0.5, 0.9], "done", task="digits")
    _fake_run(runs_a, "qat-8", 0, [0.5, 0.9], "done", task="fashion-mnist")
    _fake_run(runs_b, "qat-8", 0, [0.5, 0.9], "done", task="digits")
    assert cli.main(["report", "--runs", str(runs_a), "--out", str(docs)]) == 0
    assert cli.main(["report", "--runs", str(runs_a), "--out", str(docs), "--section", "other"]) == 0
    figures = docs / "figures"
    (figures / "mine.png").write_text("not the report's")
    fm = {f.name for f in figures.iterdir() if f.name.startswith("fashion-mnist-")}
    assert fm, sorted(f.name for f in figures.iterdir())
    assert cli.main(["report", "--runs", str(runs_b), "--out", str(docs)]) == 0
    left = {f.name for f in figures.iterdir()}
    assert not (fm & left) and "digits-mlp-curves.png" in left and "mine.png" in left
    assert any(n.startswith("other-fashion-mnist-") for n in left)  # the other section's
    text = (docs / "results.md").read_text().split(report.END)[0]
    assert all((figures / n).exists() for n in re.findall(r"\(figures/([^)]+)\)", text))


def test_report_memory_note_compares_bytes_as_printed(tmp_path):
    """A trial: ``3.03 B/param (3.03 stored)`` — the two differed in their last bit only."""
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    _fake_run(runs, "qat-8", 0, [0.5, 0.9], "done", bytes_per_param=[3.0328748742032876] * 2,
              bytes_per_param_stored=[3.032874874203287] * 2)
    assert cli.main(["report", "--runs", str(runs), "--out", str(docs)]) == 0
    text = (docs / "results.md").read_text()
    assert "3.03 B/param" in text and "(3.03 stored)" not in text


def test_report_refuses_a_file_whose_section_markers_are_ambiguous(tmp_path):
    """A marker quoted in the hand-written text, a lost END or END before BEGIN: writing
    would replace text outside the section, so nothing is written and the error says why."""
    begin, end = report.markers("study")
    path = tmp_path / "results.md"
    for text in (f"# R\n\nprose quoting `{begin}`\n\nmore prose\n",  # BEGIN only
                 f"# R\n\n`{begin}` in prose\n\n{begin}\nold\n{end}\n",  # BEGIN twice
                 f"# R\n\n{end}\nhand\n{begin}\n"):  # END first
        path.write_text(text)
        with pytest.raises(ValueError, match="expected one of each, BEGIN first"):
            report.write_section(path, "new table", "study")
        assert path.read_text() == text
    path.write_text(f"# R\n\nhand\n\n{begin}\nold\n{end}\n\ntail\n")
    report.write_section(path, "new table", "study")
    assert path.read_text() == f"# R\n\nhand\n\n{begin}\nnew table\n{end}\n\ntail\n"


def test_report_of_a_study_with_no_finished_epoch_yet(tmp_path):
    """A sweep just started: its runs have config.json and an empty metrics.json. The
    report says so (no warning from an empty figure)."""
    import warnings

    runs = tmp_path / "runs"
    _fake_run(runs, "fp", 0, [], "running")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    assert "| fp | fp | – | 0 |" in section and "1 unfinished (epochs done: 0/2)" in section


def test_report_never_leaves_results_md_half_written(tmp_path, monkeypatch):
    """The section is written to a temporary file and renamed over results.md: a failure
    before the rename (disk full, a crash) leaves the old file whole, hand-written text
    included, and no temporary file behind."""
    import lowbit.atomic as R

    path = tmp_path / "results.md"
    old = f"# R\n\nhand-written\n\n{report.BEGIN}\nold\n{report.END}\n"
    path.write_text(old)

    def no_space(*a, **kw):  # noqa: ANN002, ANN003
        raise OSError("No space left on device")

    monkeypatch.setattr(R.os, "replace", no_space)
    with pytest.raises(OSError, match="No space left"):
        report.write_section(path, "new table " * 100)
    assert path.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_write_atomic_follows_a_symlink_and_keeps_the_mode(tmp_path):
    from lowbit.experiments.rundir import write_atomic

    real = tmp_path / "real.md"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.md"
    link.symlink_to(real)
    write_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new" and (real.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.md", "real.md"]


def test_report_puts_runs_from_before_a_new_setting_in_the_same_table(tmp_path):
    """world_size entered config.json later; a run without it trained on one process, so
    it shares the table of runs recording world_size 1 (two tables before)."""
    runs = tmp_path / "runs"
    _fake_run(runs, "qat-8", 0, [0.5, 0.9], "done")
    _fake_run(runs, "fqt-ptq-4", 0, [0.2, 0.3], "done")
    cfg_path = next(runs.glob("*qat-8*")) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["train"].pop("world_size", None)
    cfg_path.write_text(json.dumps(cfg))
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    assert section.count("| recipe |") == 1


def test_report_puts_a_default_spelled_out_in_the_same_table(tmp_path):
    """A review: a text run of ``steps_per_epoch`` None (the default) and one with the
    default 200 written out are the same run to sweep and resume, but the report put them
    in two tables, their seeds apart."""
    runs = tmp_path / "runs"
    _fake_run(runs, "qat-8", 0, [2.0, 1.5], "done", task="text", bpb=[2.0, 1.5])
    _fake_run(runs, "qat-8", 1, [2.1, 1.6], "done", task="text", bpb=[2.1, 1.6])
    cfg_path = next(runs.glob("*qat-8*s1")) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["train"]["steps_per_epoch"] is None
    cfg["train"]["steps_per_epoch"] = 200  # the documented default, written out
    cfg_path.write_text(json.dumps(cfg))
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    assert section.count("| recipe |") == 1, section


# --------------------------------------------------------------------------- help text


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


def test_help_lists_every_recipe_family_and_backend(capsys) -> None:
    from lowbit.config import recipe_families
    families = ("fp, qat-B, fqt-{ptq,psq,bhq,hadamard}-B[a] and fqt-{ptq,psq,bhq,hadamard}-B-predicted "
                "with B in 4..8, fqt-{ptq,psq,bhq,hadamard}-{fp8,mxfp8,mxfp4,nvfp4}, fp8-tensorwise, "
                "fp8-rowwise, fqt-auto, fqt-auto-psq, fqt-auto-bhq")
    assert recipe_families() == families
    for command in ("train", "coverage"):
        text = _help([command], capsys)
        assert families in text
        assert "GEMM kernels: auto, reference, int8 or fp8 (default auto)" in text
    top = _help([], capsys)
    assert ("lowbit, fully quantized training: lowbit demo | train | sweep | report | variance | "
            "coverage | comm-variance [options] (lowbit COMMAND --help for each)") in top
    assert "``" not in top


def _claim_rows(section: str) -> dict[str, str]:
    """The claims table of a rendered section: claim text → verdict."""
    from lowbit.experiments.claims import CLAIMS

    texts = {c.text for c in CLAIMS}
    return {cells[1].strip(): cells[3].strip() for line in section.splitlines()
            if line.startswith("| ") and (cells := line.split("|"))[1].strip() in texts}


def _t_bounds(diffs: list[float], two_sided: bool = False) -> tuple[float, float]:
    """Student-t bounds of the mean of ``diffs`` at 95% (one-sided unless ``two_sided``),
    computed here independently of lowbit.experiments.claims."""
    from scipy.stats import t

    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    q = t.ppf(0.975 if two_sided else 0.95, n - 1) * sd / n ** 0.5
    return mean - q, mean + q


FM = "fashion-mnist"


def test_report_claims_state_each_claim_from_finished_runs(tmp_path):
    """--claims, paired by seed: a "within" claim holds when the one-sided 95% upper
    bound of the per-seed deficit is within the tolerance, does not hold when the lower
    bound is beyond it, else is unresolved; a step of the order holds when the lower bound
    of the per-seed gain is above 0; recipes sharing fewer than 2 seeds with an outcome
    are not yet measured, one without runs is named; the numbers are the seeds' mean ± std.
    A review found the old rule (2 × the larger seed std of unpaired means) declared a
    2-seed order "beyond the spread" that a paired test does not support. Fashion-MNIST:
    accuracies of 10,000 test images resolve the 0.1-point gaps these runs differ by
    (digits' 359 do not: ``claims.paired``'s floor)."""
    runs = tmp_path / "runs"
    for seed, (fp, fqt8, bhq5, qat8) in enumerate([(0.950, 0.951, 0.930, 0.940), (0.952, 0.9535, 0.931, 0.942)]):
        _fake_run(runs, "fp", seed, [0.5, fp], "done", task=FM)
        _fake_run(runs, "fqt-psq-8", seed, [0.5, fqt8], "done", task=FM)
        _fake_run(runs, "fqt-bhq-5", seed, [0.5, bhq5], "done", task=FM)
        _fake_run(runs, "qat-8", seed, [0.5, qat8], "done", task=FM)
    for seed, (bhq, psq, ptq) in enumerate([(0.92, 0.90, 0.80), (0.921, 0.905, 0.81)]):
        _fake_run(runs, "fqt-bhq-4", seed, [0.5, bhq], "done", task=FM)
        _fake_run(runs, "fqt-psq-4", seed, [0.5, psq], "done", task=FM)
        _fake_run(runs, "fqt-ptq-4", seed, [0.5, ptq], "done", task=FM)
    _fake_run(runs, "fqt-psq-fp8", 0, [0.5, 0.9], "done", task=FM)  # one seed only
    _fake_run(runs, "fqt-psq-fp8", 1, [0.5, 0.9], "running")  # all epochs, but not done: no seed
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report", with_claims=True)
    got = _claim_rows(section)
    fp8 = next(t for t in got if t.startswith("unbiased FP8"))
    within8 = "8-bit FQT = FP: not worse by more than 0.3 pt / 1% bpb"
    # FQT better by 0.10 and 0.15 pt: the deficit's upper bound −0.125 + t₀.₉₅(1)·0.025 = 0.03 pt ≤ 0.3
    gains8 = [(0.951 - 0.950) * 100, (0.9535 - 0.952) * 100]
    lo8, hi8 = _t_bounds([-g for g in gains8])
    assert got[within8] == (f"holds: fqt-psq-8 is better by {sum(gains8) / 2:.2f} pt on seeds 0,1 (paired; 95% one-sided "
                            f"bounds of how much worse: {lo8:.2f} pt to {hi8:.2f} pt; allowed: ≤ 0.30 pt)")
    # BHQ-5 worse by 1.0 and 1.1 pt: lower bound 1.05 − t₀.₉₅(1)·0.05 = 0.73 pt > 0.5
    lo, hi = _t_bounds([1.0, 1.1])
    assert got["5-bit BHQ within 0.5 pt of QAT (1% bpb)"] == (
        f"does not hold: fqt-bhq-5 is worse by 1.05 pt on seeds 0,1 (paired; 95% one-sided bounds of "
        f"how much worse: {lo:.2f} pt to {hi:.2f} pt; allowed: ≤ 0.50 pt)")
    order = got["BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread"]
    (lo1, hi1), (lo2, hi2) = _t_bounds([2.0, 1.6]), _t_bounds([10.0, 9.5])
    assert lo1 > 0 and lo2 > 0
    assert order == (f"holds: fqt-bhq-4 better than fqt-psq-4 by 1.80 pt on seeds 0,1 (paired gain, "
                     f"one-sided 95% bounds {lo1:.2f} pt to {hi1:.2f} pt: beyond the seed noise); "
                     f"fqt-psq-4 better than fqt-ptq-4 by 9.75 pt on seeds 0,1 (paired gain, one-sided "
                     f"95% bounds {lo2:.2f} pt to {hi2:.2f} pt: beyond the seed noise)")
    assert got[fp8] == "not measured: no run of fp8-rowwise"
    assert "fqt-bhq-4 92.05 ± 0.07 (2 seeds)" in section

    _fake_run(runs, "fp8-rowwise", 0, [0.5, 0.9], "done", task=FM)
    _fake_run(runs, "fp8-rowwise", 1, [0.5, 0.9], "done", task=FM)
    _fake_run(runs, "fqt-psq-4", 2, [0.5, 0.935], "done", task=FM)  # no BHQ seed 2: the pairs stay 0, 1
    _fake_run(runs, "fp", 2, [0.5, 0.951], "done", task=FM)
    _fake_run(runs, "fqt-psq-8", 2, [0.5, 0.9462], "done", task=FM)  # seed 2: 0.48 pt worse
    got = _claim_rows(report.render(report.load_runs(runs), tmp_path, "lowbit report", with_claims=True))
    assert got["BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread"] == order
    assert got[fp8] == "not yet measured (fqt-psq-fp8 and fp8-rowwise share 1 seed(s) with an outcome; 2 needed)"
    deficits = [-g for g in gains8] + [(0.951 - 0.9462) * 100]
    lo, hi = _t_bounds(deficits)  # straddles the 0.3 pt tolerance
    assert lo < 0.3 < hi
    assert got[within8] == (f"not shown with 3 seeds, the study's budget (a gap within the seed noise gets "
                            f"a third seed, then stands): fqt-psq-8 is worse by {sum(deficits) / 3:.2f} pt on "
                            f"seeds 0,1,2 (paired; 95% one-sided bounds of how much worse: {lo:.2f} pt to "
                            f"{hi:.2f} pt; allowed: ≤ 0.30 pt)")


def test_report_claims_list_only_claims_that_name_a_recipe_run(tmp_path):
    """A table of recipes no claim names (a second model's 4-bit runs, say) gets one line,
    not a table of "not measured" rows; a claim naming one of them is listed."""
    from lowbit.experiments import claims

    runs = tmp_path / "runs"
    _fake_run(runs, "fqt-psq-5", 0, [0.5, 0.9], "done")
    assert claims.lines(report.load_runs(runs)) == ["None of the study's claims names a recipe run here.", ""]
    _fake_run(runs, "fqt-ptq-4", 0, [0.5, 0.8], "done")
    table = claims.lines(report.load_runs(runs))
    assert len(table) == 4 and "BHQ ≥ PSQ ≥ PTQ" in table[2] and "not measured" in table[2]


def test_report_claims_count_failed_seeds_as_worst(tmp_path):
    """A diverged seed of the recipe that must not be worse fails "within"; a step of the
    order whose other recipe failed on every shared seed holds; a step whose paired gains
    straddle 0 is unresolved (not "does not hold": more seeds may separate them). A failed
    seed of the reference recipe no longer makes a claim hold by itself: the verdict comes
    from the finished pairs, the failure is named."""
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        _fake_run(runs, "fqt-bhq-5", seed, [0.5], "diverged", epochs=2)
        _fake_run(runs, "qat-8", seed, [0.5, 0.94], "done")
        _fake_run(runs, "fqt-bhq-4", seed, [0.5, (0.900, 0.901, 0.902)[seed]], "done")
        _fake_run(runs, "fqt-psq-4", seed, [0.5, (0.902, 0.901, 0.900)[seed]], "done")  # the same values
        _fake_run(runs, "fqt-ptq-4", seed, [0.3], "diverged", epochs=2)
        _fake_run(runs, "fqt-psq-8", seed, [0.5, 0.50], "done")  # far worse than fp ...
        _fake_run(runs, "fp", seed, [0.5, 0.94] if seed else [0.5], "done" if seed else "diverged")
    got = _claim_rows(report.render(report.load_runs(runs), tmp_path, "lowbit report", with_claims=True))
    assert got["5-bit BHQ within 0.5 pt of QAT (1% bpb)"] == \
        "does not hold: fqt-bhq-5 failed on seed(s) 0,1,2, where qat-8 finished"
    lo, hi = _t_bounds([-0.2, 0.0, 0.2])
    assert got["BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread"] == (
        f"not shown with 3 seeds, the study's budget (a gap within the seed noise gets a third seed, "
        f"then stands): fqt-bhq-4 equal to fqt-psq-4 on seeds 0,1,2 (paired "
        f"gain, one-sided 95% bounds {lo:.2f} pt to {hi:.2f} pt: within the seed noise); fqt-psq-4 "
        f"finished where fqt-ptq-4 failed, on every shared seed (0,1,2)")
    # ... whose one failed seed made "8-bit FQT = FP" hold: now the finished pairs decide
    assert got["8-bit FQT = FP: not worse by more than 0.3 pt / 1% bpb"].startswith(
        "does not hold: fqt-psq-8 is worse by 44.00 pt on seeds 1,2")
    assert got["8-bit FQT = FP: not worse by more than 0.3 pt / 1% bpb"].endswith("; fp failed on seed(s) 0")


def test_an_open_claim_is_unresolved_below_the_seed_budget_and_not_shown_at_it() -> None:
    """A step within the seed noise on 2 seeds is unresolved (the study's rule: a third
    seed); still within it on 3 seeds (the budget, ``claims.SEED_BUDGET``) it is "not
    shown": an order "beyond the seed spread" does not hold as stated."""
    from lowbit.experiments.claims import CLAIMS, SEED_BUDGET, judge
    from lowbit.experiments.report import Run

    def run(recipe: str, seed: int, acc: float) -> Run:
        return Run(Path(f"{recipe}-{seed}"), {"task": "digits", "recipe": recipe, "epochs": 1,
                                               "seed": seed}, {}, [{"epoch": 1, "accuracy": acc}], "done")

    order = CLAIMS[2]
    gains = [(0.9016, 0.9000), (0.9026, 0.9000), (0.8990, 0.9000)]  # +0.16, +0.26, −0.10 pt
    runs = [run("fqt-ptq-4", s, 0.5) for s in range(3)]
    runs += [r for s, (b, p) in enumerate(gains) for r in (run("fqt-bhq-4", s, b), run("fqt-psq-4", s, p))]
    assert SEED_BUDGET == 3
    two = [r for r in runs if r.train["seed"] < 2]
    assert judge(order, two)[1].startswith("unresolved (more seeds narrow the bounds): fqt-bhq-4 better "
                                           "than fqt-psq-4 by 0.21 pt on seeds 0,1")
    assert judge(order, runs)[1].startswith("not shown with 3 seeds, the study's budget (a gap within the "
                                            "seed noise gets a third seed, then stands): fqt-bhq-4 better "
                                            "than fqt-psq-4 by 0.11 pt on seeds 0,1,2")


def test_equal_gains_on_every_seed_are_unresolved_not_beyond_the_noise() -> None:
    """BHQ above PSQ above PTQ by one evaluation image (1/359) on each of 2 seeds: the
    spread is 0, so the Student-t bounds collapsed onto the mean and the claim read
    "beyond the seed noise" from a one-image gap (a review). The spread is now at least
    that of two values rounded to the image grid."""
    from lowbit.experiments.claims import CLAIMS, judge
    from lowbit.experiments.report import Run

    def run(recipe: str, seed: int, acc: float) -> Run:
        return Run(Path(f"{recipe}-{seed}"), {"task": "digits", "recipe": recipe, "epochs": 1,
                                               "seed": seed}, {}, [{"epoch": 1, "accuracy": acc}], "done")

    e = 1 / 359
    runs = [run(r, s, (300 + 10 * s - i) * e) for i, r in enumerate(("fqt-bhq-4", "fqt-psq-4", "fqt-ptq-4"))
            for s in (0, 1)]
    verdict = judge(CLAIMS[2], runs)[1]
    assert verdict.startswith("unresolved") and "beyond the seed noise" not in verdict
    assert "better than fqt-psq-4 by 0.28 pt on seeds 0,1" in verdict
    far = [run(r, s, (300 + 10 * s - 40 * i) * e) for i, r in enumerate(("fqt-bhq-4", "fqt-psq-4", "fqt-ptq-4"))
           for s in (0, 1)]  # 40 images a step on both seeds: beyond the rounding
    assert judge(CLAIMS[2], far)[1].startswith("holds")


def test_claims_are_not_judged_on_models_that_did_not_train() -> None:
    """One epoch on 256 digits left every recipe at chance (11.7%): "8-bit FQT = FP holds"
    (equal untrained models agree within any tolerance). Not judged now, naming why."""
    from lowbit.experiments.claims import CLAIMS, judge
    from lowbit.experiments.report import Run

    def run(recipe: str, seed: int, acc: float) -> Run:
        return Run(Path(f"{recipe}-{seed}"), {"task": "digits", "recipe": recipe, "epochs": 1,
                                               "seed": seed}, {}, [{"epoch": 1, "accuracy": acc}], "done")

    runs = [run(r, s, 0.117) for r in ("fp", "fqt-psq-8") for s in (0, 1)]
    assert judge(CLAIMS[0], runs)[1] == ("not judged: no recipe trained (means fqt-psq-8 11.70 pt, fp "
                                         "11.70 pt; chance 10.00 pt): train longer")
    trained = [run(r, s, 0.9 + (s + i) / 359) for i, r in enumerate(("fp", "fqt-psq-8")) for s in (0, 1, 2)]
    assert judge(CLAIMS[0], trained)[1].startswith("holds")  # one image better on each seed
    # a review: only the recipe under test at chance is a result, not a reason to stop
    lost = [run("fp", s, a) for s, a in ((0, 0.60), (1, 0.61), (2, 0.62))] + \
        [run("fqt-psq-8", s, a) for s, a in ((0, 0.11), (1, 0.12), (2, 0.10))]
    assert judge(CLAIMS[0], lost)[1].startswith("does not hold")
    order = [run("fqt-bhq-4", s, 0.61 + s / 100) for s in range(3)] + \
        [run("fqt-psq-4", s, 0.51 + s / 200) for s in range(3)] + [run("fqt-ptq-4", s, 0.12) for s in range(3)]
    assert judge(CLAIMS[2], order)[1].startswith("holds")


def test_an_order_claim_failing_at_its_first_step_is_not_left_unmeasured() -> None:
    """A review: BHQ 21 pt below PSQ on three seeds, PTQ with one seed: the claim said
    "not yet measured" (the short second step returned first); it does not hold."""
    from lowbit.experiments.claims import CLAIMS, judge
    from lowbit.experiments.report import Run

    def run(recipe: str, seed: int, acc: float) -> Run:
        return Run(Path(f"{recipe}-{seed}"), {"task": "digits", "recipe": recipe, "epochs": 1,
                                               "seed": seed}, {}, [{"epoch": 1, "accuracy": acc}], "done")

    runs = [run("fqt-bhq-4", s, a) for s, a in ((0, 0.30), (1, 0.31), (2, 0.29))] + \
        [run("fqt-psq-4", s, a) for s, a in ((0, 0.50), (1, 0.52), (2, 0.51))] + [run("fqt-ptq-4", 0, 0.5)]
    verdict = judge(CLAIMS[2], runs)[1]
    assert verdict.startswith("does not hold") and "share 1 seed(s)" in verdict
    better = [run("fqt-bhq-4", s, 0.6 + s / 100) for s in range(3)] + runs[3:]
    assert judge(CLAIMS[2], better)[1].startswith("not yet measured")


def test_report_claims_on_a_lower_is_better_metric() -> None:
    """Text (bpb, lower is better): the tolerance is 1% of the baseline's bpb, and a
    reversed order beyond the seed noise does not hold."""
    from lowbit.experiments.claims import CLAIMS, judge
    from lowbit.experiments.report import Run

    def run(recipe: str, seed: int, bpb: float) -> Run:
        return Run(Path(f"{recipe}-{seed}"), {"task": "text", "recipe": recipe, "epochs": 1, "seed": seed}, {},
                   [{"epoch": 1, "bpb": bpb}], "done")

    runs = [run("fp", 0, 1.500), run("fp", 1, 1.5002), run("fqt-psq-8", 0, 1.5050), run("fqt-psq-8", 1, 1.5054),
            run("fqt-bhq-4", 0, 1.60), run("fqt-bhq-4", 1, 1.601), run("fqt-psq-4", 0, 1.55),
            run("fqt-psq-4", 1, 1.551), run("fqt-ptq-4", 0, 1.70), run("fqt-ptq-4", 1, 1.701)]
    within, _, order, _ = CLAIMS
    lo, hi = _t_bounds([0.0050, 0.0052])
    assert judge(within, runs)[1] == (
        f"holds: fqt-psq-8 is worse by 0.0051 bpb on seeds 0,1 (paired; 95% one-sided bounds of how much "
        f"worse: {lo:.4f} bpb to {hi:.4f} bpb; allowed: ≤ 0.0150 bpb (1% of fp))")
    assert judge(order, runs)[1].startswith("does not hold: fqt-bhq-4 worse than fqt-psq-4 by 0.0500 bpb")
    assert "beyond the seed noise" in judge(order, runs)[1]


def test_a_non_finite_final_metric_is_no_result() -> None:
    """A NaN in a (hand-written or legacy) metrics file crashed the table's stdev; it is
    no result now, as a diverged seed's."""
    from lowbit.experiments.report import Run

    run = Run(Path("r"), {"task": "digits", "recipe": "fp", "epochs": 1, "seed": 0}, {},
              [{"epoch": 1, "accuracy": float("nan")}], "done")
    assert run.complete and run.final("accuracy") is None


def test_a_seed_finished_without_a_finite_metric_is_named_in_its_row(tmp_path):
    """A review: such a seed left the table's seed count without a word (the claims
    counted it as failed)."""
    runs = tmp_path / "runs"
    _fake_run(runs, "qat-8", 0, [0.5, 0.9], "done")
    _fake_run(runs, "qat-8", 1, [0.5, float("nan")], "done")
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    row = next(line for line in section.splitlines() if line.startswith("| qat-8 "))
    assert "| 90.00 | 1 |" in row and "1 finished without a finite accuracy" in row


def test_report_counts_each_seed_once(tmp_path):
    """The same recipe and seed in two folders (a copied run) is one seed in the table,
    and the report names the folder it ignored."""
    runs = tmp_path / "runs"
    _fake_run(runs / "a", "qat-8", 0, [0.5, 0.9], "done")
    _fake_run(runs / "a", "qat-8", 1, [0.5, 0.7], "done")
    _fake_run(runs / "b", "qat-8", 0, [0.5, 0.1], "done")
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    row = next(line for line in section.splitlines() if line.startswith("| qat-8 "))
    assert "| 80.00 ± 14.14 | 2 |" in row
    assert "Ignored 1 run folder(s) repeating a recipe and seed already counted (a finished " in section
    assert str(runs / "b") in section


def test_report_keeps_the_finished_copy_of_a_seed_whatever_the_paths(tmp_path):
    """A stale folder (empty, or stopped early) that sorts first must not hide the finished
    run of the same recipe and seed (a review found it did: "seeds 0, 1 unfinished")."""
    runs = tmp_path / "runs"
    _fake_run(runs / "a-early", "qat-8", 0, [], "running")
    _fake_run(runs / "b-half", "qat-8", 0, [0.5], "running")
    _fake_run(runs / "c-full", "qat-8", 0, [0.5, 0.9], "done")
    _fake_run(runs / "d-diverged", "qat-8", 1, [0.5], "diverged")
    _fake_run(runs / "e-full", "qat-8", 1, [0.5, 0.7], "done")
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report")
    row = next(line for line in section.splitlines() if line.startswith("| qat-8 "))
    assert "| 80.00 ± 14.14 | 2 |" in row and "unfinished" not in row
    assert "Ignored 3 run folder(s)" in section
    groups, ignored = report.one_per_seed(report.load_runs(runs))
    kept = [str(r.path.parent.name) for g in groups.values() for r in g]
    assert kept == ["c-full", "e-full"] and len(ignored) == 3


def test_report_never_averages_runs_of_two_datasets(tmp_path):
    """Seeds that read different data (config.json's ``data``: the text task falls back to
    the stdlib's sources without the Python docs) are separate tables, each naming its
    data; a run from before the record joins the one dataset its setting recorded, and
    is a table of its own where the setting recorded several."""
    one = tmp_path / "one"
    _fake_run(one / "a", "qat-8", 0, [0.5, 0.9], "done", data="digits:/here")
    _fake_run(one / "b", "qat-8", 1, [0.5, 0.7], "done", data="digits:/there")  # another copy
    _fake_run(one / "c", "qat-8", 2, [0.5, 0.8], "done")  # before the record
    section = report.render(report.load_runs(one), tmp_path, "lowbit report")
    assert section.count("| qat-8 ") == 1 and "| 80.00 ± 10.00 | 3 |" in section
    assert ("Data: digits:/here; digits:/there; not recorded by 1 of 3 runs, which predate the "
            "record and are counted with them.") in section
    two = tmp_path / "two"
    _fake_run(two / "a", "qat-8", 0, [0.5, 0.9], "done", data="python3.11-doc:/docs")
    _fake_run(two / "b", "qat-8", 1, [0.5, 0.7], "done", data="python-stdlib:/lib")
    _fake_run(two / "c", "qat-8", 2, [0.5, 0.8], "done")
    section = report.render(report.load_runs(two), tmp_path, "lowbit report")
    rows = [line for line in section.splitlines() if line.startswith("| qat-8 ")]
    assert sorted(r.split("|")[3:5] for r in rows) == [[" 70.00 ", " 1 "], [" 80.00 ", " 1 "],
                                                        [" 90.00 ", " 1 "]]
    for line in ("Data: python3.11-doc:/docs.", "Data: python-stdlib:/lib.",
                 "Data: not recorded (runs from before lowbit wrote it to config.json)."):
        assert line in section
    groups, _ = report.one_per_seed(report.load_runs(two))
    assert len(groups) == 3


def test_report_names_a_diverged_attempt_of_a_seed_rerun_to_a_finish(tmp_path):
    """A seed that diverged and was rerun to a finish: the table counts the finished run
    and its row says an attempt diverged (it was only a path in the "Ignored" line), as
    do the claims' numbers; a seed that diverged twice was not rerun to a finish; a rerun
    still going is named; another dataset's table is not told about it."""
    runs = tmp_path / "runs"
    _fake_run(runs / "first", "qat-8", 1, [0.5], "diverged")
    _fake_run(runs / "first", "qat-8", 0, [0.5, 0.9], "done")
    _fake_run(runs / "rerun", "qat-8", 1, [0.5, 0.7], "done")
    _fake_run(runs / "first", "fp", 0, [0.5, 0.9], "done")
    _fake_run(runs / "first", "fqt-psq-8", 0, [0.5], "diverged")
    _fake_run(runs / "rerun", "fqt-psq-8", 0, [0.5], "diverged")
    _fake_run(runs / "first", "fqt-psq-8", 1, [0.5], "diverged")
    _fake_run(runs / "rerun", "fqt-psq-8", 1, [0.5], "running")
    section = report.render(report.load_runs(runs), tmp_path, "lowbit report", with_claims=True)
    row = {line.split("|")[1].strip(): line for line in section.splitlines()
           if line.startswith("| ") and line.split("|")[1].strip() in ("qat-8", "fp", "fqt-psq-8")}
    assert "| 80.00 ± 14.14 | 2 |" in row["qat-8"]
    assert "an earlier attempt diverged (seed 1; rerun)" in row["qat-8"]
    assert "diverged" not in row["fp"]
    assert "2 diverged; seed 1 being rerun, epochs done: 1/2 |" in row["fqt-psq-8"]
    assert "rerun)" not in row["fqt-psq-8"]  # seed 0 diverged twice: no finished rerun
    # the claims' numbers: seed 0 failed twice and was never rerun to a finish (a review
    # found it called "1 failed attempt(s) rerun")
    claim = next(line for line in section.splitlines() if line.startswith("| 8-bit FQT = FP"))
    assert "fqt-psq-8 –, 2 failed (diverged or no metric)" in claim and "rerun" not in claim
    from lowbit.experiments.claims import outcomes
    loaded = report.load_runs(runs)
    assert outcomes(loaded, "qat-8", "accuracy").retried == 1  # seed 1: diverged, then finished
    assert outcomes(loaded, "fqt-psq-8", "accuracy").retried == 0
    other = tmp_path / "other"  # the same seed on another dataset: its own table, no note
    _fake_run(other / "a", "qat-8", 1, [0.5], "diverged", data="python3.11-stdlib:/lib")
    _fake_run(other / "b", "qat-8", 1, [0.5, 0.7], "done", data="python3.11-stdlib:/lib")
    _fake_run(other / "c", "qat-8", 1, [0.5, 0.8], "done", data="python3.11-doc:/docs")
    section = report.render(report.load_runs(other), tmp_path, "lowbit report")
    rows = sorted(line for line in section.splitlines() if line.startswith("| qat-8 "))
    assert len(rows) == 2 and sum("an earlier attempt diverged" in r for r in rows) == 1
    assert "an earlier attempt diverged" in next(r for r in rows if "| 70.00 |" in r)


def test_report_skips_a_run_whose_data_record_is_not_text(tmp_path, capsys):
    """A hand-edited ``"data": {...}`` crashed the report with an AttributeError; the
    folder is skipped with a line naming it, as any unreadable run."""
    runs = tmp_path / "runs"
    _fake_run(runs / "a", "qat-8", 0, [0.5, 0.9], "done", data="digits:/x")
    _fake_run(runs / "b", "qat-8", 1, [0.5, 0.7], "done", data={"kind": "digits"})
    assert len(report.load_runs(runs)) == 1
    assert "data record must be a string" in capsys.readouterr().err


def test_sweep_skips_a_run_whose_epochs_read_another_dataset(tmp_path, capsys):
    """One run of a sweep that cannot resume because its folder's epochs read other data
    is skipped with the reason (as a run of other settings), the rest of the grid trains,
    and the sweep exits 1; no "resumed" line precedes the refusal."""
    from lowbit.experiments.rundir import write_status

    main = cli.main
    out = tmp_path / "sw"
    args = ["sweep", "--tasks", "digits", "--models", "mlp", "--recipes", "fp,qat-8",
            "--epochs", "2", "--subset", "256", "--eval-subset", "64", "--out", str(out),
            "--no-progress"]
    assert main(args[:6] + ["fp"] + args[7:]) == 0
    run_dir = out / "digits-mlp-fp-s0"
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(config, data="other-digits:/x")))
    rows = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps(rows[:1]))
    write_status(run_dir, "interrupted")
    assert (run_dir / "last.pt").exists()  # a finished run keeps its checkpoint
    capsys.readouterr()
    assert main(args) == 1
    printed = capsys.readouterr()
    assert "digits-mlp-fp-s0: skipped, cannot resume" in printed.out
    assert "its epochs so far trained on other-digits:/x" in printed.out
    assert "resumed" not in printed.err
    assert json.loads((out / "digits-mlp-qat-8-s0" / "status.json").read_text())["status"] == "done"


def test_report_prints_the_runs_it_counted(tmp_path, capsys):
    """The command's line names the runs the section counts ("from 2 runs"), not the
    folders it read (it printed 3 there)."""
    import argparse
    runs = tmp_path / "runs"
    _fake_run(runs / "a", "qat-8", 0, [0.5, 0.9], "done")
    _fake_run(runs / "a", "qat-8", 1, [0.5, 0.7], "done")
    _fake_run(runs / "b", "qat-8", 0, [0.5, 0.1], "done")
    report.run(argparse.Namespace(runs=str(runs), out=str(tmp_path / "docs"), section=None, claims=False))
    assert "report: 2 runs (1 folder(s) ignored as repeats) -> " in capsys.readouterr().out
    assert "from 2 runs." in (tmp_path / "docs" / "results.md").read_text()


def test_sweep_recognises_its_own_runs_through_json(tmp_path):
    """config.json turns tuples into lists, and configs written before weights/opt_state
    existed lack them: neither is "other settings" (a review of settings_diff)."""
    from lowbit.experiments.sweep import run_state, settings_diff
    from lowbit.experiments.trainer import TrainConfig

    cfg = TrainConfig(task="fashion-mnist", model="preact-resnet20", model_kwargs={"widths": (8, 16, 32)},
                      out=str(tmp_path))
    train = cfg.to_dict()
    del train["weights"], train["opt_state"]  # an old config
    (tmp_path / "config.json").write_text(json.dumps({"train": train}))
    assert settings_diff(cfg) == [] and run_state(cfg) == "new"
    other = TrainConfig(task="fashion-mnist", model="preact-resnet20", model_kwargs={"widths": (8, 16, 64)},
                        out=str(tmp_path))
    assert settings_diff(other) == ["model_kwargs ({'widths': [8, 16, 32]}, now {'widths': [8, 16, 64]})"]
    # a trial: a run of the same version asked for with another --backend was also said to
    # be "recorded by another version" (the backend is in the resolved config)
    import dataclasses

    fqt = TrainConfig(task="digits", model="mlp", recipe="fqt-psq-8", out=str(tmp_path / "b"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"train": fqt.to_dict(), "fqt": fqt.fqt_config().to_dict()}))
    assert settings_diff(fqt) == []
    assert settings_diff(dataclasses.replace(fqt, backend="reference")) == ["backend ('auto', now 'reference')"]
    old = {**fqt.fqt_config().to_dict(), "seed": 12345}  # the same settings, another resolution
    (tmp_path / "b" / "config.json").write_text(json.dumps({"train": fqt.to_dict(), "fqt": old}))
    assert settings_diff(fqt) == ["the quantization config fqt-psq-8 resolves to (recorded by another version)"]


def test_sweep_finishes_restarts_or_skips_what_its_folders_hold(tmp_path, capsys):
    """Three folders a sweep found and mishandled: all epochs but status "running" (killed
    before the last write) was "done" for the sweep and unfinished for the report — it is
    resumed to "done" now; epochs recorded without a checkpoint (a committed folder) made
    the trainer refuse and the whole sweep stop — the run is redone from its start; a
    checkpoint that does not load stopped the sweep with a traceback — that run is skipped
    with the reason, the rest trains, and the sweep exits 1."""
    from lowbit.experiments.rundir import write_status
    from lowbit.experiments.sweep import run_state
    from lowbit.experiments.trainer import TrainConfig

    out = tmp_path / "sw"
    base = ["sweep", "--tasks", "digits", "--models", "mlp", "--epochs", "2", "--subset", "256",
            "--eval-subset", "64", "--out", str(out), "--no-progress"]
    assert cli.main(base + ["--recipes", "fp,qat-8,fqt-psq-8"]) == 0
    fp, qat, psq = (out / f"digits-mlp-{r}-s0" for r in ("fp", "qat-8", "fqt-psq-8"))
    write_status(fp, "running")  # killed between the last metrics and the status write
    for f in ("last.pt", "prev.pt"):  # a committed folder: metrics, no checkpoint
        (qat / f).unlink()
    write_status(qat, "running")
    (psq / "last.pt").write_bytes(b"not a zip")
    (psq / "prev.pt").unlink()
    write_status(psq, "interrupted")
    states = {d.name: run_state(TrainConfig(task="digits", model="mlp", recipe=r, epochs=2, subset=256,
                                            eval_subset=64, out=str(d)))
              for r, d in (("fp", fp), ("qat-8", qat), ("fqt-psq-8", psq))}
    assert list(states.values()) == ["partial", "restart", "partial"]
    capsys.readouterr()
    assert cli.main(base + ["--recipes", "fp,qat-8,fqt-psq-8"]) == 1
    printed = capsys.readouterr().out
    assert "digits-mlp-qat-8-s0: restarting (epochs recorded, no checkpoint" in printed
    assert "digits-mlp-fqt-psq-8-s0: skipped, no usable checkpoint" in printed
    for d, want in ((fp, "done"), (qat, "done"), (psq, "interrupted")):
        assert json.loads((d / "status.json").read_text())["status"] == want


def test_sweep_does_not_call_a_folder_without_its_settings_done(tmp_path, capsys):
    """A review: a 5-epoch run whose config.json was lost was "done, skipped" for a
    3-epoch sweep (its settings could not be compared); the folder is skipped as one
    whose settings cannot be checked, and the sweep exits 1."""
    out = tmp_path / "sw"
    base = ["sweep", "--tasks", "digits", "--models", "mlp", "--recipes", "fp", "--subset", "128",
            "--eval-subset", "64", "--out", str(out), "--no-progress"]
    assert cli.main(base + ["--epochs", "2"]) == 0
    (out / "digits-mlp-fp-s0" / "config.json").unlink()
    capsys.readouterr()
    assert cli.main(base + ["--epochs", "1"]) == 1
    assert "config.json (missing or unreadable beside metrics.json" in capsys.readouterr().out


def test_sweep_does_not_call_a_run_of_another_resolved_recipe_done(tmp_path, capsys):
    """A second review: the resume refused a checkpoint whose recipe resolved otherwise
    (an older default margin), but the sweep compared the training settings only and
    called such a folder done."""
    out = tmp_path / "sw"
    base = ["sweep", "--tasks", "digits", "--models", "mlp", "--recipes", "fqt-psq-8-predicted",
            "--subset", "128", "--eval-subset", "64", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert cli.main(base) == 0
    config = out / "digits-mlp-fqt-psq-8-predicted-s0" / "config.json"
    record = json.loads(config.read_text())
    for path in ("grad_input", "grad_weight"):
        record["fqt"][path]["margin"] = 2.0  # what an older version resolved the recipe to
    config.write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main(base) == 1
    assert "the quantization config fqt-psq-8-predicted resolves to" in capsys.readouterr().out


def test_importing_the_cli_leaves_matplotlib_alone():
    """``lowbit.cli`` imports every command; the report's module selected matplotlib's Agg
    backend at import time, switching a notebook user's interactive backend. matplotlib
    is imported (with Agg) only when a figure is made."""
    code = ("import sys, lowbit.cli, lowbit.experiments.report, lowbit.experiments.monitoring\n"
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_small_cli_edges_a_new_user_met(tmp_path, capsys):
    """A new user's walkthrough: the dry run listed runs of other settings without the
    reason and exited 0 (the real sweep then skipped them, exit 1); ``fp,,qat-8`` was
    accepted (a name lost between the commas); ``--help`` printed "(8) (default 8)"."""
    out = tmp_path / "sw"
    base = ["sweep", "--tasks", "digits", "--models", "mlp", "--recipes", "fp", "--subset", "128",
            "--eval-subset", "64", "--out", str(out), "--no-progress"]
    assert cli.main(base + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--epochs", "2", "--dry-run"]) == 1
    assert "other settings: epochs (1, now 2)" in capsys.readouterr().out
    assert cli.main(["sweep", "--recipes", "fp,,qat-8", "--out", str(tmp_path / "x"), "--dry-run"]) == 2
    assert "--recipes has an empty item" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "(default 8)" not in capsys.readouterr().out


def test_a_running_seed_does_not_cut_the_finished_seeds_curve(tmp_path, monkeypatch):
    """The curves figure averaged a recipe's seeds up to the epoch all had reached: a seed
    still at epoch 1 cut the finished seeds' 3-epoch curve to one point. The finished seeds
    are drawn; accuracy in % as the tables."""
    runs = tmp_path / "runs"
    _fake_run(runs / "a", "qat-8", 0, [0.5, 0.7, 0.9], "done", epochs=3)
    _fake_run(runs / "b", "qat-8", 1, [0.4], "running", epochs=3)
    figs = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figs.append(fig))
    report.plot_curves(report.load_runs(runs), tmp_path / "c.png")
    ax = figs[0].axes[0]
    assert ax.lines[0].get_xydata().tolist() == [[1, 50.0], [2, 70.0], [3, 90.0]]
    assert ax.get_ylabel() == "accuracy (%)"


def test_tables_of_one_task_and_model_have_headings_that_tell_them_apart(tmp_path):
    """Three "### digits — mlp" headings, told apart only by their Settings lines: each
    heading names the settings in which its table differs from the others."""
    runs = tmp_path / "runs"
    _fake_run(runs / "a", "qat-8", 0, [0.5, 0.9], "done", epochs=2)
    _fake_run(runs / "b", "qat-8", 0, [0.5, 0.6, 0.9], "done", epochs=3)
    _fake_run(runs / "c", "qat-8", 0, [0.5, 0.6, 0.7, 0.9], "done", epochs=4)
    headings = [line for line in report.render(report.load_runs(runs), tmp_path, "lowbit report").splitlines()
                if line.startswith("### ")]
    assert len(headings) == len(set(headings)) == 3
    assert "### digits — mlp (epochs 3" in " ".join(headings)
    single = tmp_path / "single"
    _fake_run(single, "qat-8", 0, [0.5, 0.9], "done")
    assert "### digits — mlp\n" in report.render(report.load_runs(single), tmp_path, "lowbit report") + "\n"


def test_adaptive_runs_of_other_monitor_intervals_are_other_rows() -> None:
    """A review: ``fqt-auto`` runs with ``--monitor-every 1`` and ``4`` (their widths follow
    the interval) shared one label, so seeds of both were averaged into one row."""
    from lowbit.experiments.report import Run

    def label(recipe: str, every: int | None) -> str:
        train = {"task": "digits", "recipe": recipe, "epochs": 1, "seed": 0}
        train |= {} if every is None else {"monitor_every": every}
        return Run(Path("r"), train, {}, [{"epoch": 1, "accuracy": 0.5}], "done").label

    assert label("fqt-auto", 1) == "fqt-auto, monitor every 1" and label("fqt-auto", 4) == "fqt-auto, monitor every 4"
    assert label("fqt-auto", 50) == label("fqt-auto", None) == "fqt-auto"  # the default: as recorded before
    assert label("fqt-psq-8", 4) == "fqt-psq-8"  # a fixed recipe's values do not depend on it


def test_an_infinite_variance_ratio_is_reported_not_dropped(tmp_path):
    """A review: an infinite largest ratio was written to metrics.json as null, so the
    report's ratio column took the epoch for one without a monitored step ("–", or the
    seed left out of the mean). A flag beside it keeps it: the column says inf."""
    runs = tmp_path / "runs"
    _fake_run(runs, "fqt-psq-8", 0, [0.5, 0.9], "done", ratio_x_max=[2.0, float("inf")],
              ratio_x_max_inf=[False, True])
    run = report.load_runs(runs)[0]
    assert run.rows[1]["ratio_x_max"] is None  # JSON keeps no Inf
    assert run.ratio_trace("x") == (2.0, 2.0, math.inf)
    section = report.render([run], tmp_path, "lowbit report")
    row = next(line for line in section.splitlines() if line.startswith("| fqt-psq-8 "))
    assert "∇X 2 → 2 → inf" in row


def test_resume_without_out_names_the_default_folder(tmp_path, capsys, monkeypatch):
    """A new user's trial: ``--resume`` without ``--out`` named a folder the user never
    chose; the error now says it is the default one and to give --out."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--resume", "--task", "digits"]) == 2
    err = capsys.readouterr().err
    assert "(the default folder of these settings: give the run's folder with --out)" in err


def test_a_default_spelled_out_is_the_same_setting():
    """A new user's trial: a text run recorded with steps_per_epoch None (the default, 200)
    was "other settings" beside the same command with --steps-per-epoch 200."""
    from lowbit.experiments.runconfig import TrainConfig, changed_settings

    saved = TrainConfig(task="text", recipe="fp").to_dict()
    assert changed_settings(saved, TrainConfig(task="text", recipe="fp", steps_per_epoch=200)) == []
    assert changed_settings(saved, TrainConfig(task="text", recipe="fp", steps_per_epoch=100)) == \
        ["steps_per_epoch (200, now 100)"]


@pytest.mark.parametrize(("recipe", "backend"), [("fqt-psq-fp8", "fp8"), ("fqt-bhq-4a", "int8")])
def test_a_backend_that_cannot_run_the_model_is_refused_before_any_step(tmp_path, capsys, recipe, backend):
    """A new user's trial: the refusal came at the first step, after a multi-line
    ConversionWarning, leaving a run folder behind; now one line (exit 2), no folder."""
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "digits", "--model", "cnn", "--recipe", recipe, "--backend", backend,
                     "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"lowbit train: error: backend='{backend}' cannot run these GEMMs" in err and "--backend auto" in err
    assert not out.exists()
    # one line: convert's ConversionWarning (with lowbit's own source line) no longer
    # precedes the same words (a second new user's trial), here and in `lowbit coverage`
    import warnings

    from lowbit.conversion import ConversionWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["train", "--task", "digits", "--model", "cnn", "--recipe", recipe, "--backend", backend,
                         "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
        assert cli.main(["coverage", "--task", "digits", "--model", "cnn", "--recipe", recipe,
                         "--backend", backend]) == 2
    assert not [w for w in caught if issubclass(w.category, ConversionWarning)]
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and f"lowbit coverage: error: backend='{backend}'" in err, err


def test_a_sweep_goes_on_past_a_refused_run_and_leaves_no_lock_only_folder(tmp_path, capsys):
    """A review: a sweep run refused before writing a file (a backend that cannot run the
    model's GEMMs) left a folder holding only ``.lock`` and stopped the rest of the grid
    (exit 2). Now that run's folder is removed, the other runs train, and the sweep
    exits 1 naming the failed run."""
    out = tmp_path / "sw"
    args = ["sweep", "--tasks", "digits", "--models", "cnn", "--recipes", "fqt-bhq-4a,fp",
            "--backend", "int8", "--epochs", "1", "--subset", "64", "--eval-subset", "32",
            "--batch-size", "32", "--out", str(out), "--no-progress"]
    assert cli.main([*args, "--dry-run"]) == 1  # as the sweep will exit (a second review)
    listing = capsys.readouterr().out
    assert "failed" in listing and "backend='int8' cannot run these GEMMs" in listing and not out.exists()
    rc = cli.main(args)
    printed = capsys.readouterr().out
    assert rc == 1
    assert "digits-cnn-fqt-bhq-4a-s0: failed, backend='int8' cannot run these GEMMs" in printed
    assert "1 run(s) failed" in printed and "digits-cnn-fqt-bhq-4a-s0" in printed.splitlines()[-1]
    assert not (out / "digits-cnn-fqt-bhq-4a-s0").exists()
    assert json.loads((out / "digits-cnn-fp-s0" / "status.json").read_text())["status"] == "done"


def test_a_sweep_goes_on_past_missing_data_and_an_unreadable_folder(tmp_path, capsys, monkeypatch):
    """A second review: only a ValueError let the sweep go on; data not found (a
    FileNotFoundError) stopped the grid with exit 2, and an unreadable status.json stopped
    it before any run. Both are now that run's failure, the others train, exit 1."""
    out = tmp_path / "sw"
    bad = out / "digits-mlp-fp-s0"
    bad.mkdir(parents=True)
    (bad / "status.json").write_text("{")
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "nowhere"))
    rc = cli.main(["sweep", "--tasks", "fashion-mnist,digits", "--models", "preact-resnet20,mlp", "--recipes", "fp,qat-8",
                   "--epochs", "1", "--subset", "64", "--eval-subset", "32", "--batch-size", "32",
                   "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "fashion-mnist-preact-resnet20-fp-s0: failed, DataNotFoundError" in printed
    assert "digits-mlp-fp-s0: failed" in printed and "not readable" in printed
    assert json.loads((out / "digits-mlp-qat-8-s0" / "status.json").read_text())["status"] == "done"
    assert not (out / "fashion-mnist-preact-resnet20-fp-s0").exists()


@pytest.mark.parametrize("command", [["sweep", "--dry-run"], ["report", "--runs", "."]])
def test_sweep_and_report_need_out(tmp_path, capsys, monkeypatch, command):
    """``sweep`` wrote into ``./results`` and ``report`` rewrote ``./docs/results.md`` by
    default — run from this repository's root, the committed study (a new user's trial);
    now ``--out`` is required, as for ``variance``."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(command)
    assert exc.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_of_another_run_says_the_settings_differ_not_pass_resume(tmp_path, capsys):
    """Training into a folder holding a finished run of other settings said only "pass
    --resume to continue it", and --resume then refused the settings (a new user's trial):
    the refusal now names the difference and says that --resume reads the options left
    out from config.json; a run of the same settings still points to --resume."""
    base = ["train", "--task", "digits", "--model", "mlp", "--subset", "64", "--eval-subset", "32",
            "--batch-size", "32", "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main([*base, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "a run with other settings: --epochs (1, now 2). To train these settings, choose another --out; " \
           "to continue that run, pass --resume and leave those options out" in err, err
    assert cli.main([*base, "--epochs", "1"]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    # a second trial: --backend, --weight-decay, --model-arg and --eval-subset are not in the
    # folder's name either; the refusal names them as options, and --help lists them
    assert cli.main([*base, "--epochs", "1", "--backend", "reference", "--model-arg", "hidden=32"]) == 2
    err = capsys.readouterr().err
    assert "--backend ('auto', now 'reference')" in err and "--model-arg ({}, now {'hidden': 32})" in err, err
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    helptext = "".join(capsys.readouterr().out.split())  # (argparse wraps "--weight-decay" at its hyphen)
    named = helptext[helptext.index("--outOUT"):helptext.index("needsitsown--out")]
    for option in ("--backend", "--epochs", "--lr", "--weight-decay", "--eval-subset", "--model-arg"):
        assert option in named, option


def test_resume_without_out_reads_the_default_folders_settings(tmp_path, capsys, monkeypatch):
    """``lowbit train --recipe R --resume`` (no ``--out``) compared the run with the
    defaults (``different epochs (2, now 10)``) where the same folder given by ``--out``
    resumed with its recorded settings (a new user's trial): now both read them."""
    monkeypatch.chdir(tmp_path)
    base = ["train", "--task", "digits", "--model", "mlp", "--recipe", "fp", "--no-progress"]
    assert cli.main([*base, "--epochs", "1", "--subset", "64", "--eval-subset", "32", "--batch-size", "32"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming runs/digits-mlp-fp-s0 with the settings" in err and "epochs" in err, err


def test_bare_lowbit_lists_the_commands_and_version_is_known(capsys):
    """Bare ``lowbit`` printed only "the following arguments are required: COMMAND", and
    ``lowbit --version`` did not exist (a new user's trial)."""
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "usage: lowbit" in err and all(c in err for c in ("demo", "train", "coverage", "comm-variance"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("lowbit ")


def test_resume_without_out_under_nproc_looks_for_the_data_parallel_folder(tmp_path, capsys, monkeypatch):
    """``--resume --nproc 2`` without ``--out`` looked for the single-rank folder (the run
    name's ``-n2`` was added after the name was worked out; a review): it names the
    data-parallel run's folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["train", "--task", "digits", "--model", "mlp", "--recipe", "fp", "--resume",
                     "--nproc", "2"]) == 2
    assert "runs/digits-mlp-fp-n2-s0 does not exist" in capsys.readouterr().err


def _run_folder(root: Path, name: str, finals: list[float], status: str = "done", **train: object) -> None:
    """A run folder named ``name`` (two folders of one recipe and seed), per-epoch accuracy
    ``finals``; ``train``: TrainConfig fields."""
    from lowbit.experiments.trainer import TrainConfig, write_metrics, write_status

    cfg = TrainConfig(task="digits", epochs=len(finals), **train)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "fqt": cfg.fqt_config().to_dict()}))
    write_metrics(run_dir, [{"epoch": i + 1, "accuracy": a, "step_time_ms": 10.0} for i, a in enumerate(finals)])
    write_status(run_dir, status)


def test_bits_figure_leaves_other_backends_out(tmp_path):
    """Sweeps of ``--backend auto`` and ``--backend reference`` side by side: the table
    gives them two rows, the "gradient bits" figure averaged both into the PSQ-8 point,
    each seed twice (a review)."""
    runs = tmp_path / "runs"
    _run_folder(runs, "auto-s0", [0.1, 0.9], recipe="fqt-psq-8", seed=0)
    _run_folder(runs, "ref-s0", [0.1, 0.7], recipe="fqt-psq-8", seed=0, backend="reference")
    _run_folder(runs, "fp-ref", [0.1, 0.5], recipe="fp", seed=0, backend="reference")
    points, refs = report.bits_points(report.load_runs(runs), "accuracy")
    assert {q: dict(b) for q, b in points.items()} == {"psq": {8: [0.9]}} and not refs["fp"]


def test_table_and_claims_count_the_same_folder_of_a_seed(tmp_path):
    """Two finished folders of one seed, one without a finite accuracy: the table kept the
    NaN one (the first by path) and said the seed failed, the claims took the finite one
    (81.00 over 1 seed against 80.50 ± 0.71 over 2 in one report: a review)."""
    runs = tmp_path / "runs"
    _run_folder(runs, "psq-s0a", [0.5, math.nan], recipe="fqt-psq-8", seed=0)
    _run_folder(runs, "psq-s0b", [0.5, 0.80], recipe="fqt-psq-8", seed=0)
    _run_folder(runs, "psq-s1", [0.5, 0.81], recipe="fqt-psq-8", seed=1)
    groups, repeats = report.one_per_seed(report.load_runs(runs))
    (group,) = groups.values()
    assert sorted(r.path.name for r in group) == ["psq-s0b", "psq-s1"]
    assert [r.path.name for r in repeats] == ["psq-s0a"]


def test_a_monitor_log_without_a_finite_ratio_is_drawn_with_a_note(tmp_path, monkeypatch):
    """A new user: a BatchNorm model's only monitored step (no finite ratio) gave two empty
    0–1 axes with no word, and the two rows' labels overlapped in a 5.2-in figure."""
    import lowbit.plots
    from lowbit.experiments import monitoring

    runs = tmp_path / "runs"
    _fake_run(runs, "fqt-psq-8", 0, [0.1, 0.9], "done")
    loaded = report.load_runs(runs)
    log = {"specs": {"net.1": {}}, "history": [{"step": 0, "layers": {"net.1": {"ratio_w": None, "ratio_x": None}}}]}
    (Path(loaded[0].path) / monitoring.LOG).write_text(json.dumps(log))
    figures = []
    real = lowbit.plots.save_figure
    monkeypatch.setattr(lowbit.plots, "save_figure", lambda fig, path, **kw: figures.append(fig) or real(fig, path, **kw))
    assert monitoring.plot_ratios(loaded, tmp_path / "v.png") is True
    (fig,) = figures
    assert fig.get_size_inches()[1] >= 6.4
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert notes == ["no finite ratio", "no finite ratio"]
    # an infinite ratio (no minibatch variance) is written "inf" by lowbit.jsonfile, and read
    # back as a number (a review: math.isfinite("inf") stopped the whole report)
    log["history"].append({"step": 1, "layers": {"net.1": {"ratio_w": "inf", "ratio_x": 0.5}}})
    (Path(loaded[0].path) / monitoring.LOG).write_text(json.dumps(log))
    assert monitoring.plot_ratios(loaded, tmp_path / "v2.png") is True


def test_sweep_lines_are_said_by_the_launchs_rank_0_only(capsys, monkeypatch):
    """Under torchrun the sweep's listing and run statuses come once, from rank 0; a
    leftover ``RANK`` without a multi-rank ``WORLD_SIZE`` is no launch (a review: a stale
    ``RANK=1`` hid every line of a single-process sweep)."""
    from lowbit.experiments import sweep

    for rank, world, said in (("1", "1", True), ("1", "2", False), ("0", "2", True), ("1", None, True)):
        monkeypatch.setenv("RANK", rank)
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        sweep._say("a line")
        assert (capsys.readouterr().out == "a line\n") == said, (rank, world)


def test_sweep_names_torchruns_option_for_the_ranks(tmp_path, capsys, monkeypatch):
    """A review: under a 2-rank launch a batch that does not split said "must be a multiple
    of --nproc (2)", an option ``lowbit sweep`` does not have: torchrun's is named."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["sweep", "--recipes", "fp", "--batch-size", "63", "--epochs", "1", "--out", str(tmp_path),
                     "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node" in err and "--nproc " not in err.replace("--nproc-per-node", ""), err
    # outside a launch, and lowbit train's own option in advice: as the trainer says them
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["sweep", "--recipes", "fqt-psq-8", "--grad-comm", "int8", "--epochs", "1", "--out",
                     str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node N (lowbit train: or with --nproc N)" in err and "the launch's" not in err, err


def test_report_figures_are_written_whole_and_its_command_runs_as_written(tmp_path, monkeypatch):
    """A new user's trial (README fault kind 263): a report killed while saving a figure
    left an empty PNG that the previous results.md still showed — figures were written in
    place, results.md atomically. Now a figure is written to a temporary file and renamed:
    a failure mid-write leaves the old figure whole and no temporary file. And the "Generated
    by" command line, with a path holding a space, split into other arguments when run; it
    is shell-quoted now (as ``lowbit variance``'s is)."""
    import shlex

    from lowbit.plots import pyplot, save_figure

    plt = pyplot()
    path = tmp_path / "fig.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    save_figure(fig, path)
    old = path.read_bytes()
    assert old.startswith(b"\x89PNG") and old.rstrip().endswith(b"IEND\xaeB`\x82")

    fig, ax = plt.subplots()
    ax.plot([1, 0])

    def killed(f, **kw):  # noqa: ANN001, ANN003
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]

    runs, out = tmp_path / "with space" / "runs", tmp_path / "with space" / "report"
    _fake_run(runs, "fp", 0, [0.5, 0.9], "done")
    assert cli.main(["report", "--runs", str(runs), "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    command = text[text.index("Generated by `") + len("Generated by `"):].split("`")[0]
    assert shlex.split(command) == ["lowbit", "report", "--runs", str(runs), "--out", str(out)]
