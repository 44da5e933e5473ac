"""The live variance monitor against the measuring toolkit, at several points of training.

For a task's model trained with ``fqt-psq-8`` and snapshotted at ``--points`` steps,
and for each ∇W-path quantizer in ``--quantizers`` at each of ``--bits``:

* toolkit: :func:`lowbit.analysis.gradient_variance` on ``--batches`` i.i.d. minibatches
  (``--repeats`` FQT draws each): per layer (weight + bias), ``sgd`` (variance of the QAT
  gradient across the minibatches) and ``quant`` (variance of the FQT gradient over draws
  of one minibatch, mean over minibatches), with jackknife standard errors;
* monitor: :class:`lowbit.monitor.VarianceMonitor` on one FQT pass of each of the same
  minibatches: ``sgd_w`` (per-sample norms, formula (1) of lowbit.varstats) and ``quant_w``
  (exact), averaged over the minibatches, standard error = std / √batches.

Only the ∇W path is quantized (``grad_input=None``): then a layer's quantization variance
is its own ∇W-path noise alone, which is what the monitor's ``quant_w`` is (with the ∇X
path on, the toolkit's figure would also hold the noise of the layers downstream). Agreement
is ``|z| = |monitor − toolkit| / √(se_m² + se_t²) ≤ 3`` per layer.

    python benchmarks/monitor_check.py --task text --points 0,100,300 --out runs/monitor-text.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time

import torch

import lowbit
from lowbit import FQTConfig, GradSpec
from lowbit.analysis import gradient_variance
from lowbit.analysis._model import frozen_buffers, with_config
from lowbit.experiments.tasks import make_task
from lowbit.monitor import VarianceMonitor


def snapshots(task, points: list[int], seed: int, batch_size: int, lr: float) -> dict[int, dict]:
    """The model's state after each of ``points`` optimizer steps of fqt-psq-8 training."""
    torch.manual_seed(seed)
    model = lowbit.convert(task.build_model(), FQTConfig.from_recipe("fqt-psq-8", seed=seed))
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if task.optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95)))
    gen, out, step = torch.Generator().manual_seed(seed), {}, 0
    while step <= max(points):
        for batch in task.train_batches(batch_size, gen):
            if step in points:
                out[step] = copy.deepcopy(model.state_dict())
            if step >= max(points):
                return out
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
            step += 1
    return out


def monitor_figures(model, task, batches, cfg: FQTConfig) -> dict[str, dict[str, float]]:
    """Per layer: mean and standard error over ``batches`` of the monitor's sgd_w, quant_w."""
    with with_config(model, lambda _: cfg), frozen_buffers(model):
        mon = VarianceMonitor(model, every=1)
        for batch in batches:
            with mon.step():
                model.zero_grad(set_to_none=True)
                task.loss(model, batch).backward()
        mon.close()
    out = {}
    for name in mon.layers:
        row = {}
        for key in ("sgd_w", "quant_w"):
            vals = [getattr(r.layers[name], key) for r in mon.history]
            row[key] = statistics.fmean(vals)
            row[key + "_se"] = statistics.stdev(vals) / math.sqrt(len(vals))
        out[name] = row
    model.zero_grad(set_to_none=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="text")
    p.add_argument("--subset", type=int)
    p.add_argument("--points", default="0,100,300")
    p.add_argument("--train-batch", type=int, help="training batch (default: the task's)")
    p.add_argument("--batch", type=int, help="measurement minibatch (default: the task's)")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quantizers", default="ptq,psq,bhq")
    p.add_argument("--bits", default="4,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    task = make_task(a.task, subset=a.subset)
    points = [int(s) for s in a.points.split(",")]
    t0 = time.time()
    snaps = snapshots(task, points, a.seed, a.train_batch or task.default_batch_size,
                      task.default_lr)
    print(f"trained to {points} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    torch.manual_seed(a.seed)
    model = lowbit.convert(task.build_model(), FQTConfig.from_recipe("fqt-psq-8", seed=a.seed))
    gen = torch.Generator().manual_seed(a.seed + 1)
    results = []
    for point in points:
        model.load_state_dict(snaps[point])
        model.train()
        batches = []
        for batch in task.train_batches(a.batch or task.default_batch_size, gen):
            batches.append(batch)
            if len(batches) == a.batches:
                break
        for q in a.quantizers.split(","):
            for bits in (int(b) for b in a.bits.split(",")):
                cfg = FQTConfig(grad_input=None, grad_weight=GradSpec(bits, q), seed=a.seed)
                t1 = time.time()
                tk = gradient_variance(model, task.loss, batches, config=cfg, repeats=a.repeats,
                                       seed=a.seed)
                mon = monitor_figures(model, task, batches, cfg)
                for layer, m in mon.items():
                    g = tk.groups[layer]
                    row = {"point": point, "quantizer": q, "bits": bits, "layer": layer,
                           "toolkit_sgd": g.sgd, "toolkit_sgd_se": g.sgd_se,
                           "toolkit_quant": g.quant, "toolkit_quant_se": g.quant_se, **m}
                    for kind in ("sgd", "quant"):
                        t, ts = g.sgd if kind == "sgd" else g.quant, g.sgd_se if kind == "sgd" else g.quant_se
                        mv, ms = m[f"{kind}_w"], m[f"{kind}_w_se"]
                        row[f"z_{kind}"] = (mv - t) / math.sqrt(ts**2 + ms**2) if ts or ms else 0.0
                        row[f"ratio_{kind}"] = mv / t if t else math.nan
                    results.append(row)
                zs = [abs(r[f"z_{k}"]) for r in results[-len(mon):] for k in ("sgd", "quant")]
                print(f"step {point} {q}{bits}: {len(mon)} layers, max |z| {max(zs):.2f} "
                      f"({time.time() - t1:.0f} s)", file=sys.stderr, flush=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "rows": results, "seconds": time.time() - t0}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
