"""``lowbit variance``: argument checks and a small end-to-end run on digits."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from lowbit.cli import build_parser, main


def parse(*argv: str):
    return build_parser().parse_args(["variance", *argv])


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "cifar"], "--task must be one of digits, fashion-mnist, text"),
    (["--task", "digits", "--quantizers", "ptq,fp8"], "allowed: ptq, psq, bhq, hadamard"),
    (["--task", "digits", "--bits", "4,9"], "--bits must be integers in 2..8"),
    (["--task", "digits", "--model", "gpt"], "must be one of mlp, cnn"),
    (["--task", "digits", "--batches", "2"], "--batches must be ≥ 3"),
    (["--task", "digits", "--repeats", "1"], "--repeats must be ≥ 2"),
    (["--task", "digits", "--spectrum", "full"], "--spectrum must be one of pairs, layer"),
    (["--task", "digits", "--bound-batches", "20"], "must be ≤ --batches"),
    (["--task", "digits", "--ranges", "dynamic,guessed"], "--ranges must be a comma-separated list"),
    (["--task", "digits", "--ranges", "predicted", "--range-calibration", "0"], "--range-calibration must be ≥ 1"),
    (["--task", "digits", "--ranges", "predicted", "--range-margin", "0.5"],
     "--range-margin must be a finite number ≥ 1"),
    # a trial: options of a stage that does not run were accepted, and recorded as used
    (["--task", "digits", "--lr", "0.5"], "--lr applies to the warm-up (--train-steps N), which this command"),
    (["--task", "digits", "--range-margin", "2"], "--range-margin applies to predicted ranges"),
    (["--task", "digits", "--range-history", "8"], "--range-history applies to predicted ranges"),
    (["--task", "digits", "--range-calibration", "4"], "--range-calibration applies to predicted ranges"),
    (["--task", "digits", "--profile", "none", "--profile-repeats", "3"], "--profile-repeats applies to the profile"),
    (["--task", "digits", "--profile", "none", "--profile-batches", "1"], "--profile-batches applies to the profile"),
    (["--task", "digits", "--bound-batches", "0", "--power-iters", "3"], "--power-iters applies to the bound"),
    (["--task", "digits", "--bound-batches", "0", "--spectrum", "pairs"], "--spectrum applies to the bound"),
    (["--task", "digits", "--formats", "fp8_e4m3", "--bound-batches", "0", "--bin-layer", "net.3"],
     "--bin-layer applies to the bin figure"),
    (["--task", "digits", "--formats", "int4,fp6"], "--formats: unknown format 'fp6'; allowed: int2"),
    # a new user: --bits was ignored without a word next to --formats
    (["--task", "digits", "--formats", "fp8_e5m2", "--bits", "4"], "--bits and --formats both given"),
    (["--task", "digits", "--rounding", "stochastic,up"], "--rounding must be a comma-separated list"),
    # a review: every (format, range) combination skipped, exit 0 with empty outputs
    (["--task", "digits", "--ranges", "predicted", "--formats", "mxfp4"], "nothing would be measured"),
    # a review: 0 was taken for "the default" (32) while 1 was refused
    (["--task", "digits", "--batch-size", "0"], "--batch-size must be ≥ 2, got 0"),
    # a review: a profile quantizer outside --quantizers was skipped without a word
    (["--task", "digits", "--quantizers", "ptq", "--profile", "psq"], "--profile names psq, not among --quantizers (ptq)"),
])
def test_bad_arguments_name_the_allowed_values(argv, message, tmp_path) -> None:
    from lowbit.commands.variance import validate
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(parse(*argv, "--out", str(tmp_path)))


def test_a_name_given_twice_is_measured_once(tmp_path) -> None:
    from lowbit.commands.variance import validate
    opts = validate(parse("--task", "digits", "--quantizers", "psq,bhq,psq", "--bits", "4,4,8",
                          "--ranges", "dynamic,dynamic", "--out", str(tmp_path)))
    assert opts.quantizers == ["psq", "bhq"] and opts.formats == ["int4", "int8"]
    assert opts.ranges == ["dynamic"]


def test_training_batches_larger_than_the_data_are_refused_not_looped_on(tmp_path, capsys) -> None:
    # --batch-size above the examples loaded with --train-steps > 0: no training minibatch
    # fits, and the warm-up looped for ever (a review's run was killed after 60 s)
    assert main(["variance", "--task", "digits", "--subset", "20", "--train-steps", "2", "--quantizers",
                 "psq", "--bits", "4", "--batches", "3", "--repeats", "2", "--profile", "none",
                 "--bound-batches", "0", "--out", str(tmp_path / "v"), "--quiet"]) == 2
    assert "--batch-size 32 exceeds the 20 training examples loaded" in capsys.readouterr().err


def test_cli_error_is_one_line_and_status_2(tmp_path, capsys) -> None:
    assert main(["variance", "--task", "digits", "--bits", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--bits" in err


def test_end_to_end_on_digits(tmp_path, capsys) -> None:
    out = tmp_path / "v"
    rc = main(["variance", "--task", "digits", "--model", "mlp", "--quantizers", "ptq,bhq",
               "--bits", "4", "--out", str(out), "--batches", "3", "--repeats", "3",
               "--train-steps", "5", "--profile", "bhq", "--profile-repeats", "3",
               "--spectrum", "pairs", "--power-iters", "3", "--quiet"])
    assert rc == 0
    def no_bare_nan(token: str) -> None:  # a review found NaN tokens: not JSON
        raise AssertionError(f"variance.json holds {token}")

    res = json.loads((out / "variance.json").read_text(), parse_constant=no_bare_nan)
    assert {"command", "machine", "args", "warmup", "groups", "layers", "spectra", "bins",
            "runs", "seconds"} <= set(res)
    assert [(r["quantizer"], r["bits"]) for r in res["runs"]] == [("ptq", 4), ("bhq", 4)]
    total = res["runs"][0]["report"]["groups"]["total"]
    keys = {"sgd", "quant", "total", "rel_gap", "gap_se", "max_abs_z", "tightness_data"}
    assert keys <= set(total)
    assert res["runs"][1]["profile"]["layers"] == res["layers"]
    with (out / "variance.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert "total" in res["groups"] and len(rows) == 2 * len(res["groups"])
    for name in ("bins_4bit.png", "profile_bhq_int4.png", "bounds.png", "summary.md"):
        assert (out / name).stat().st_size > 500, name
    assert "| bhq | int4 (4) |" in (out / "summary.md").read_text()
    # the layer profile's ratios with their standard errors (a 3 at 2 repeats was noise)
    profile = (out / "summary.md").read_text().split("## Variance profile")[1].split("##")[0]
    rows = [r for r in profile.splitlines() if r.startswith("| ") and "layer" not in r]
    assert rows and all(r.count(" ± ") == 2 for r in rows)
    # 3 × 3 draws: the bias z cannot pass √9 = 3, which the summary says (a review)
    assert "√(batches × repeats) = 3.00" in (out / "summary.md").read_text()
    assert "cannot show a bias at 5σ" in (out / "summary.md").read_text()
    assert "| bhq | int4 (4) |" in capsys.readouterr().out  # the results, not only a file name
    # a second run into the folder replaced these results without a word: refused before
    # any work, naming --overwrite; with it, the options validate
    before = (out / "variance.json").read_bytes()
    assert main(["variance", "--task", "digits", "--out", str(out)]) == 2
    assert (out / "variance.json").read_bytes() == before
    from lowbit.commands.variance import validate
    assert validate(parse("--task", "digits", "--out", str(out), "--overwrite")).out == out


def test_predicted_ranges_are_measured_against_dynamic(tmp_path) -> None:
    out = tmp_path / "v"
    rc = main(["variance", "--task", "digits", "--model", "mlp", "--quantizers", "psq",
               "--bits", "4", "--out", str(out), "--batches", "3", "--repeats", "3",
               "--ranges", "dynamic,predicted,predicted-clip", "--range-calibration", "4",
               "--range-margin", "1.5", "--range-history", "8",  # predicted rows only: dynamic accepts
               "--bound-batches", "0", "--profile", "none", "--quiet"])
    assert rc == 0
    res = json.loads((out / "variance.json").read_text())
    assert [r["range"] for r in res["runs"]] == ["dynamic", "predicted", "predicted-clip"]
    n_layers = len(res["layers"])
    for r in res["runs"][1:]:
        st = r["range_stats"]
        # every study draw (3 batches × 3 repeats) quantized ∇W of each layer and ∇X of all
        # but the first, none of them as a warm-up (the histories were calibrated)
        assert st["calls"] == 9 * (2 * n_layers - 1) and st["dynamic_calls"] == 0
    assert "## Predicted ranges against dynamic ranges" in (out / "summary.md").read_text()
    with (out / "variance.csv").open() as fh:
        assert {row["range"] for row in csv.DictReader(fh)} == {"dynamic", "predicted",
                                                               "predicted-clip"}


def test_formats_and_nearest_rounding_on_digits(tmp_path) -> None:
    out = tmp_path / "v"
    rc = main(["variance", "--task", "digits", "--model", "mlp", "--quantizers", "psq,ptq",
               "--formats", "int4a,fp8_e5m2,mxfp4", "--rounding", "stochastic,nearest",
               "--out", str(out), "--batches", "3", "--repeats", "2", "--bound-batches", "0",
               "--profile", "none", "--quiet"])
    assert rc == 0
    res = json.loads((out / "variance.json").read_text())
    assert [(r["format"], r["rounding"], r["bits"]) for r in res["runs"] if r["quantizer"] == "psq"] == [
        ("int4a", "stochastic", 4), ("int4a", "nearest", 4), ("fp8_e5m2", "stochastic", 8),
        ("fp8_e5m2", "nearest", 8), ("mxfp4", "stochastic", 4), ("mxfp4", "nearest", 4)]
    for r in res["runs"]:
        assert ("z_batches" in r) == (r["rounding"] == "nearest")
        assert r["report"]["groups"]["total"]["quant"] == r["report"]["groups"]["total"]["quant"]
    text = (out / "summary.md").read_text()
    assert "| psq | fp8_e5m2 (8) |" in text and "| psq, nearest | mxfp4 (4) |" in text
    # "PTQ / this" against PTQ of the row's own rounding (a trial: a nearest row was divided
    # into the stochastic PTQ's variance — 6540 for PTQ against itself)
    ptq_rows = _summary_rows(text, "ptq")
    assert len(ptq_rows) == 6 and all(float(r[4]) == 1.0 for r in ptq_rows), ptq_rows
    # the bin study's grids are the symmetric ones: int4a's is another (a review: its table
    # was int4's, levels −7…7)
    assert res["bins"]["by_bits"] == {} and "Measured on symmetric integer grids" in text


def _summary_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_tightness_is_shown_only_where_a_bound_applies(tmp_path) -> None:
    """A review: a predicted-range row printed "– (dynamic-range bounds)" under "bound
    holds" but a tightness number beside it, and a round-to-nearest row "nan / nan"."""
    out = tmp_path / "v"
    assert main(["variance", "--task", "digits", "--model", "mlp", "--quantizers", "psq", "--bits", "4",
                 "--ranges", "dynamic,predicted", "--rounding", "stochastic,nearest", "--range-calibration", "2",
                 "--batches", "3", "--repeats", "3", "--bound-batches", "1", "--profile", "none",
                 "--out", str(out), "--quiet"]) == 0
    text = (out / "summary.md").read_text()
    rows = {r[0]: r for r in _summary_rows(text, "psq") if r[1] == "int4 (4)"}  # the decomposition table
    assert set(rows) == {"psq", "psq, nearest", "psq (predicted range)", "psq (predicted range), nearest"}
    assert re.fullmatch(r"[\d.e+-]+ / [\d.e+-]+", rows["psq"][-1])  # dynamic, stochastic: both ratios
    for label in ("psq, nearest", "psq (predicted range)", "psq (predicted range), nearest"):
        assert rows[label][-1] == "–", rows[label]
    assert "nan" not in text.lower().replace("nanoseconds", "")
    # the predicted-range table: each row against the dynamic run of its own rounding
    res = json.loads((out / "variance.json").read_text())
    quant = {(r["range"], r["rounding"]): r["report"]["groups"]["total"]["quant"] for r in res["runs"]}
    ranged = {r[2]: r for r in _summary_rows(text, "psq") if r[1] == "int4"}
    assert set(ranged) == {"predicted", "predicted, nearest"}
    for cell, rounding in (("predicted", "stochastic"), ("predicted, nearest", "nearest")):
        want = quant[("predicted", rounding)] / quant[("dynamic", rounding)]
        assert ranged[cell][4] == f"{want:.3g}", (cell, ranged[cell], want)


def test_overwrite_removes_every_file_of_the_earlier_run(tmp_path, capsys) -> None:
    """A review: ``--overwrite`` replaced the tables but left the earlier run's figures
    (``bins_4bit.png`` beside a run with no bin study); a folder holding only such a
    figure is an earlier run's too."""
    out = tmp_path / "v"
    common = ["variance", "--task", "digits", "--model", "mlp", "--quantizers", "psq", "--batches", "3",
              "--repeats", "2", "--bound-batches", "0", "--profile", "none", "--out", str(out), "--quiet"]
    assert main([*common, "--bits", "4"]) == 0
    assert (out / "bins_4bit.png").exists()
    (out / "variance.json").unlink(), (out / "variance.csv").unlink(), (out / "summary.md").unlink()
    assert main([*common, "--formats", "int4a"]) == 2
    assert "already holds bins_4bit.png from an earlier run" in capsys.readouterr().err
    (out / "profile_picture.png").write_text("the user's own"), (out / "notes.txt").write_text("mine")
    assert main([*common, "--formats", "int4a", "--overwrite"]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["notes.txt", "profile_picture.png", "summary.md",
                                                     "variance.csv", "variance.json"]
    # files the command never writes are neither taken for an earlier run's nor removed (a second review)
    other = tmp_path / "own"
    other.mkdir()
    (other / "profile_picture.png").write_text("the user's own")
    assert main([*common[:-3], "--out", str(other), "--quiet", "--formats", "int4a"]) == 0
    assert (other / "profile_picture.png").read_text() == "the user's own"


def test_a_json_output_that_is_a_pipe_or_a_device_is_refused_before_the_work(tmp_path, capsys) -> None:
    """A second review: ``--json`` at a FIFO passed the check and the atomic write then
    replaced the pipe by a file; ``--json /dev/stdout`` failed after the whole step."""
    import os

    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    assert main(["coverage", "--task", "digits", "--json", str(fifo)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"lowbit coverage: error: --json: {fifo} is not a regular file (a pipe or a device); give a file's path"
    assert fifo.is_fifo()


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path, monkeypatch, capsys) -> None:
    """A review: ``--out`` in a folder the user cannot write in gave a traceback (status 1),
    ``comm-variance``'s after its whole measurement (``os.access`` says yes to root on a
    read-only mount or in /sys); any other OSError of a command is one line too."""
    import tempfile

    import lowbit.commands.coverage as coverage_command

    real = tempfile.TemporaryFile

    def refuse(*a, dir=None, **kw):  # noqa: A002 - tempfile's name
        if dir is not None and str(dir).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*a, dir=dir, **kw)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    for argv in (["variance", "--task", "digits", "--out", str(tmp_path / "ro" / "new")],
                 ["comm-variance", "--task", "digits", "--out", str(tmp_path / "ro")],
                 ["coverage", "--task", "digits", "--json", str(tmp_path / "ro" / "c.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and ("cannot write in" in err or "is not writable" in err), err
    assert list((tmp_path / "ro").iterdir()) == []

    def fail(args):
        raise PermissionError(13, "Permission denied", "/somewhere/x.json")

    monkeypatch.setattr(coverage_command, "run", fail)
    assert main(["coverage", "--task", "digits"]) == 2
    assert capsys.readouterr().err.strip() == \
        "lowbit coverage: error: [Errno 13] Permission denied: '/somewhere/x.json'"


def test_warmup_trend_windows_never_overlap() -> None:
    """The warm-up line compares the mean loss of the first and last steps; with 10 steps
    or fewer both means used to cover the same steps ("2.287 → 2.287")."""
    import math

    from lowbit.commands.variance_data import describe_warmup, loss_trend

    assert loss_trend([4.0, 3.0, 2.0, 1.0]) == {"loss_first": 3.5, "loss_last": 1.5, "window": 2}
    assert loss_trend([float(i) for i in range(30, 0, -1)])["window"] == 10
    assert loss_trend([5.0]) == {"loss_first": 5.0, "loss_last": 5.0, "window": 1}
    assert math.isnan(loss_trend([])["loss_first"])
    line = describe_warmup({"steps": 4, "lr": 0.1, **loss_trend([4.0, 3.0, 2.0, 1.0])})
    assert line == "4 QAT steps at lr 0.1, loss 3.500 → 1.500 (means of the first and last 2 steps)"
    assert describe_warmup({"steps": 0}) == "none (the model as initialised)"


@pytest.mark.parametrize("option, value, match", [
    ("--quantizers", "psq,,bhq", "--quantizers has an empty item"),
    ("--ranges", "dynamic,", "--ranges has an empty item"),
    ("--rounding", ",", "--rounding must be a non-empty comma-separated list"),
    ("--formats", "int4,,int8", "--formats has an empty item"),
])
def test_list_options_refuse_empty_items(tmp_path, capsys, option, value, match) -> None:
    """A review (as ``fp,,qat-8`` for the sweep): an empty item between commas was
    dropped without a word; it is refused, naming the option."""
    assert main(["variance", "--task", "digits", option, value, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_missing_data_leaves_no_empty_out_folder(tmp_path, monkeypatch) -> None:
    """``lowbit variance`` made ``--out`` before loading the data, so a missing dataset
    left an empty folder behind (a new user's trial): the folder is made once the data
    loaded."""
    import lowbit.commands.variance as V

    def missing(opts):  # noqa: ANN001, ANN202
        raise FileNotFoundError("Fashion-MNIST not found (a test)")

    monkeypatch.setattr(V, "Data", missing)
    out = tmp_path / "v"
    with pytest.raises(FileNotFoundError, match="a test"):
        V.run(parse("--task", "digits", "--out", str(out)))
    assert not out.exists()


def test_default_profile_shows_standard_errors(tmp_path) -> None:
    """With the default two draws per layer the profile's ratios had no standard error, so
    a noisy 3 read as a bound violation (a new user's trial; 1.5 ± 0.6 with 6 draws): the
    default is now 4 draws, and every profile row carries ± its standard error."""
    out = tmp_path / "v"
    assert main(["variance", "--task", "digits", "--model", "mlp", "--quantizers", "psq", "--bits", "4",
                 "--out", str(out), "--batches", "3", "--repeats", "2", "--train-steps", "2", "--quiet"]) == 0
    text = (out / "summary.md").read_text()
    rows = text.split("## Variance profile")[1].split("\n## ")[0].splitlines()
    layer_rows = [r for r in rows if r.startswith("| net.")]
    assert layer_rows and all(r.count("±") == 2 for r in layer_rows), layer_rows


def test_a_model_with_low_bit_attention_bounds_the_groups_after_it_and_keeps_its_results(tmp_path) -> None:
    """A new user: ``lowbit variance --task text`` (low-bit attention, which the Theorem 2
    bound has no term for) spent its power iterations on a bound that was NaN for every
    group, then failed in the bounds plot ("Data cannot be log-scaled"), with variance.json
    never written; the fix then skipped the bound for every group. A review: attention's
    noise reaches only the groups upstream of it — the layers after the last attention
    (the head) keep their bound, the others are "–" with the reason in the summary."""
    out = tmp_path / "t"
    rc = main(["variance", "--task", "text", "--quantizers", "psq", "--bits", "4", "--batches", "3",
               "--repeats", "2", "--subset", "100000", "--batch-size", "2", "--train-steps", "0",
               "--profile", "none", "--out", str(out), "--threads", "1", "--quiet"])
    assert rc == 0
    res = json.loads((out / "variance.json").read_text())
    assert "attention products ('blocks.0.attn.sdpa'" in res["bound_note"] and len(res["spectra"]) == 1
    groups = res["runs"][0]["report"]["groups"]
    assert groups["head"]["pred_data"] is not None and groups["head"]["pred_data"] > 0  # after every attention
    assert groups["blocks.0.attn.qkv"]["pred_data"] is None and groups["total"]["pred_data"] is None  # NaN: upstream
    assert "blocks.0.attn.qkv" in res["runs"][0]["report"]["unbounded"]
    assert (out / "bounds.png").exists()
    assert "Bounds: gpt quantizes attention products" in (out / "summary.md").read_text()  # the "–" cells' reason


def test_the_bounds_plot_of_reports_without_a_finite_bound_is_drawn_with_a_note(tmp_path) -> None:
    """The same run's plot, had it been called: every bound NaN left no point for the log
    axes, and matplotlib raised. It is drawn with a note instead."""
    from types import SimpleNamespace

    from lowbit.analysis.plots import plot_bounds

    g = SimpleNamespace(pred_data=math.nan, pred_analytic=math.nan, quant_bound_batches=1e-3)  # what it reads
    rep = SimpleNamespace(groups={"total": g, "0.weight": g})
    assert plot_bounds([("psq-int4", rep)], tmp_path / "b.png").stat().st_size > 500


def test_a_long_measurement_says_what_it_does_where_there_are_no_progress_bars(tmp_path, capsys) -> None:
    """stderr not a terminal (a log, ``| tee``, pytest's capture): no progress bars, so
    one line per stage, counted; none with ``--quiet`` (a new user's walkthrough: minutes
    of silence)."""
    args = ["variance", "--task", "digits", "--model", "mlp", "--quantizers", "ptq,psq", "--bits", "4",
            "--batches", "3", "--repeats", "2", "--train-steps", "2", "--bound-batches", "0", "--profile", "none"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    stages = [ln for ln in err.splitlines() if ln.startswith("lowbit variance: ")]
    assert stages == ["lowbit variance: warm-up (2 training steps) ...",
                      "lowbit variance: [1/2] ptq-int4: 3 minibatches × 2 draws ...",
                      "lowbit variance: [2/2] psq-int4: 3 minibatches × 2 draws ..."], err
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "lowbit variance: [" not in capsys.readouterr().err
    # skipped combinations (predicted ranges of a block format) are not counted (a review:
    # "[1/4]", "[3/4]", "[4/4]")
    skip = ["variance", "--task", "digits", "--model", "mlp", "--quantizers", "psq", "--formats", "mxfp4,int4",
            "--ranges", "dynamic,predicted", "--batches", "3", "--repeats", "2", "--train-steps", "0",
            "--bound-batches", "0", "--profile", "none", "--range-calibration", "1"]
    assert main([*skip, "--out", str(tmp_path / "c")]) == 0
    counted = [ln.split(": ")[1].split()[0] for ln in capsys.readouterr().err.splitlines()
               if ln.startswith("lowbit variance: [")]
    assert counted == ["[1/3]", "[2/3]", "[3/3]"], counted


def test_an_interrupted_study_leaves_none_of_its_results(tmp_path, monkeypatch) -> None:
    """A trial: Ctrl-C during ``lowbit variance`` left its plots without a variance.json,
    and the rerun was refused as "already holds bins_4bit.png … from an earlier run"."""
    import lowbit.commands.variance as variance

    def interrupted(*args, **kwargs):  # after variance.json, variance.csv and the plots
        raise KeyboardInterrupt

    monkeypatch.setattr(variance, "summary", interrupted)
    args = ["variance", "--task", "digits", "--model", "mlp", "--quantizers", "psq", "--bits", "4",
            "--batches", "3", "--repeats", "2", "--bound-batches", "0", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "new")]) == 130  # lowbit's exit code for Ctrl-C
    assert not (tmp_path / "new").exists()  # created by the run, emptied: removed
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main([*args, "--out", str(kept)]) == 130
    assert [f.name for f in kept.iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    assert main([*args, "--out", str(kept)]) == 0  # no refusal: nothing of an earlier run
    # a failure once the results are whole keeps them (a review: `| head` closing stdout
    # deleted a finished study)
    def closed(*args, **kwargs):
        raise BrokenPipeError

    monkeypatch.setattr(variance, "print", closed, raising=False)
    with pytest.raises(BrokenPipeError):
        variance.run(build_parser().parse_args([*args, "--out", str(tmp_path / "piped")]))
    assert {"variance.json", "variance.csv", "summary.md"} <= {f.name for f in (tmp_path / "piped").iterdir()}
