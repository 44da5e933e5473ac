"""The variance monitor in training runs (lowbit.experiments.monitoring): per-epoch
columns, monitor.json, adaptive recipes resumed bitwise after a crash, the report figure."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_trainer import DIGITS, _Interrupt, _InterruptAt, one_thread  # noqa: F401 (autouse fixture)

from lowbit.experiments import report
from lowbit.experiments import tasks as T
from lowbit.experiments.runconfig import TIMING_FIELDS
from lowbit.experiments.trainer import TrainConfig, train


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history]


def test_monitor_columns_and_log(tmp_path) -> None:
    cfg = TrainConfig(**DIGITS, recipe="fqt-bhq-4", epochs=2, monitor_every=3, out=str(tmp_path))
    result = train(cfg, progress=False)
    row = result.history[-1]
    layers = ["net.1", "net.3", "net.5"]  # DigitsMLP's three Linear layers
    assert row["monitor_steps"] == 3  # steps 8..15 of epoch 2: 9, 12, 15
    assert all(0 < row[f"ratio_w:{n}"] < math.inf for n in layers)
    assert "ratio_x:net.1" not in row  # the first layer's input needs no gradient
    assert row["ratio_x_max"] == max(row[f"ratio_x:{n}"] for n in layers[1:])
    assert (row["grad_bits_gi"], row["grad_bits_gw"]) == (4, 8)
    # weighted by ∇Y size (hidden 128, 10 classes): ∇X runs on net.3/net.5, ∇W on all three
    assert row["grad_bits_mean"] == pytest.approx((4 * (128 + 10) + 8 * (128 + 128 + 10)) / 404, rel=1e-12)
    def no_bare_nan(token: str) -> None:  # a new user: the first layer's ∇X ratio was a bare NaN
        raise AssertionError(f"monitor.json holds {token}: not JSON")

    log = json.loads((tmp_path / "monitor.json").read_text(), parse_constant=no_bare_nan)
    assert [r["step"] for r in log["history"]] == [0, 3, 6, 9, 12, 15]
    assert log["history"][-1]["layers"]["net.1"]["ratio_x"] is None  # NaN written as null
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "ratio_w:net.3" in header
    off = train(TrainConfig(**DIGITS, recipe="fqt-bhq-4", epochs=1, monitor_every=0,
                            out=str(tmp_path / "off")), progress=False)
    assert "monitor_steps" not in off.history[-1] and not (tmp_path / "off" / "monitor.json").exists()


def test_adaptive_run_resumes_bitwise(tmp_path) -> None:
    cfg = dict(DIGITS, recipe="fqt-auto", epochs=2, monitor_every=2)
    ref = train(TrainConfig(**cfg, out=str(tmp_path / "a")), progress=False)
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    with pytest.raises(_Interrupt):  # killed in epoch 2, after one checkpoint
        train(TrainConfig(**cfg, out=str(tmp_path / "b")), task=_InterruptAt(task, 11), progress=False)
    resumed = train(TrainConfig(**cfg, out=str(tmp_path / "b")), resume=True, progress=False)
    sa, sb = ref.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.dumps(_strip(ref.history)) == json.dumps(_strip(resumed.history))
    la = json.loads((tmp_path / "a" / "monitor.json").read_text())
    lb = json.loads((tmp_path / "b" / "monitor.json").read_text())
    assert la == lb and la["decisions"], "fqt-auto must decide, and identically after resume"
    last = ref.history[-1]
    assert 2 <= last["grad_bits_mean"] < 8 and last["bit_changes"] >= 0
    assert {last[f"bits_x:{n}"] for n in ("net.3", "net.5")} <= set(range(2, 9))
    assert "bits_x:net.1" not in last and last["bits_w:net.1"] in range(2, 9)  # no ∇X path


def test_adaptive_recipe_needs_the_monitor() -> None:
    with pytest.raises(ValueError, match="monitor_every must be ≥ 1 for fqt-auto: .* \\(got 0\\)"):
        TrainConfig(**DIGITS, recipe="fqt-auto", monitor_every=0)
    # a user who never gave --monitor-every read "must be ≥ 1 ... (got 50, world_size 2)"
    with pytest.raises(ValueError, match="fqt-auto trains on a single rank only, not on 2 data-parallel "
                                         "ranks: .* train it in one process \\(without --nproc or torchrun\\)"):
        TrainConfig(**DIGITS, recipe="fqt-auto", world_size=2)
    with pytest.raises(ValueError, match="monitor_every must be a non-negative integer, got -1"):
        TrainConfig(**DIGITS, recipe="fqt-psq-8", monitor_every=-1)


def test_report_plots_ratios_and_labels_adaptive_runs(tmp_path) -> None:
    for recipe in ("fqt-auto", "fqt-psq-8"):
        train(TrainConfig(**DIGITS, recipe=recipe, epochs=1, monitor_every=2,
                          out=str(tmp_path / "runs" / recipe)), progress=False)
    runs = report.load_runs(tmp_path / "runs")
    body = report.render(runs, tmp_path, "lowbit report")
    assert "digits-mlp-variance.png" in body and (tmp_path / "digits-mlp-variance.png").exists()
    line = next(x for x in body.splitlines() if x.startswith("| fqt-auto, monitor every 2 "))  # not the default 50
    assert "gi:psq,bhq2–8/gw:psq2–8 adaptive" in line  # no "|": it would split the table cell and "mean gradient bits ∇X" in line
