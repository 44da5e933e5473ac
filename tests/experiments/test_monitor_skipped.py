"""A monitor the run cannot build is reported, never dropped silently: a warning when the
user asked for it, an info line on the trainer's default."""

from __future__ import annotations

import argparse
import logging

import pytest
from test_trainer import DIGITS, one_thread  # noqa: F401 (autouse fixture)

import lowbit
from lowbit.experiments import monitoring
from lowbit.experiments import tasks as T
from lowbit.experiments.train import add_arguments, training_fields
from lowbit.experiments.trainer import TrainConfig

PREDICTED = "predicted gradient ranges: the grid is not the operand's own"
NEAREST = "round-to-nearest gradients: biased, no rounding variance to compare"


def _monitor(recipe: str, every: int, requested: bool, caplog):
    cfg = TrainConfig(**DIGITS, recipe=recipe, monitor_every=every)
    model = T.make_task("digits", "mlp", subset=64, eval_subset=64).build_model()
    if recipe != "fp":
        lowbit.convert(model, cfg.fqt_config())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowbit.train"):
        mon = monitoring.make_monitor(model, cfg, requested)
    return mon, [(r.levelno, r.getMessage()) for r in caplog.records]


@pytest.mark.parametrize("recipe, why", [
    ("fqt-psq-8-predicted", PREDICTED),
    ("fp8-rowwise", NEAREST),
    ("fp", "the model has no quantized layer"),
])
def test_unmonitorable_recipe_warns_when_requested(recipe, why, caplog) -> None:
    msg = (f"monitor_every=1 with recipe {recipe}: no layer can be monitored: {why} "
           f"(no monitor.json, no ratio_* columns)")
    mon, records = _monitor(recipe, 1, True, caplog)
    assert mon is None and records == [(logging.WARNING, msg)]
    mon, records = _monitor(recipe, 1, False, caplog)  # the default: info only, and none for
    # fp/QAT, which quantize no gradient (a new user's demo printed the line for every fp run)
    assert mon is None and records == ([] if recipe == "fp" else [(logging.INFO, msg)])


def test_monitorable_recipe_logs_nothing(caplog) -> None:
    mon, records = _monitor("fqt-psq-8", 1, True, caplog)
    assert mon is not None and records == []
    mon, records = _monitor("fqt-psq-8-predicted", 0, True, caplog)  # off: nothing to say
    assert mon is None and records == []


def test_cli_monitor_every_given_or_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.monitor_every is None and "monitor_every" not in training_fields(args)
    assert training_fields(parser.parse_args(["--monitor-every", "1"]))["monitor_every"] == 1
