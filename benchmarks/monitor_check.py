"""The live variance monitor against the measuring toolkit, at several points of training.

For a task's model trained with ``fqt-psq-8`` and snapshotted at ``--points`` steps:

* **minibatch variance**: :func:`lowbit.analysis.gradient_variance` on ``--sgd-batches``
  i.i.d. minibatches gives, per layer (weight + bias), the variance of the QAT gradient
  across them (``sgd``, jackknife s.e.); the monitor, on one pass of each of the same
  minibatches, its estimate ``sgd_w``, averaged (s.e. = std/√n): per-sample norms
  (formula (1) of lowbit.varstats), or on a model with BatchNorm the paired estimate
  ``½‖g_k − g_{k−1}‖²`` over the disjoint pairs of consecutive minibatches (weights and
  BatchNorm statistics frozen, so no drift term); the per-sample figure is recorded too
  (``per_sample_ratio``). Agreement: ``|z| = |Δ| / √(se_t² + se_m²) ≤ 3``.
* **quantization variance**, for each ∇W-path quantizer of ``--quantizers`` at each of
  ``--bits``: the toolkit's :func:`lowbit.analysis.quantization_variance` on each of
  ``--quant-batches`` minibatches (``E‖g_FQT − g_QAT‖²`` with the exact QAT gradient, mean
  over ``--repeats`` FQT draws) against the monitor's exact ``quant_w`` on the same
  minibatch, paired: ``z`` = mean difference / its s.e. over the minibatches, ``|z| ≤ 3``.
  Only the ∇W path is quantized (``grad_input=None``): a layer's quantization variance is
  then its own ∇W-path noise alone, which is what ``quant_w`` is (with the ∇X path on, the
  toolkit's figure also holds the noise of the layers downstream).

* **∇X path** (``--path grad_input``), for each layer of ``--layers``, one at a time:
  that layer's ∇X path quantized (``--quantizers`` × ``--bits``), its ∇W path and every
  other layer's gradients exact. The monitor reports ``quant_x = E‖∇X_FQT − ∇X_QAT‖²``
  (the noise of the layer's own input gradient, before any propagation) and
  ``quant_x_shift``, the same for the column sums of ∇X (the gradient of a shift added
  to the layer's input). The toolkit measures parameter gradients only, so two zero
  probe parameters are added to the layer's input for the check (a forward pre-hook,
  ``x + P + β``; the forward is bitwise unchanged): ``P`` of the input's full shape
  (``∇P = ∇X``) and ``β`` per feature/channel (``∇β`` = column sum of ∇X);
  :func:`~lowbit.analysis.quantization_variance` of ``∇P`` and ``∇β`` is compared with
  ``quant_x`` and ``quant_x_shift`` on the same minibatches (paired z as above). On the
  text model the LayerNorm whose output is the layer's input (``ln1`` → ``attn.qkv``,
  ``ln2`` → ``mlp.0``, ``ln_f`` → ``head``) has a bias gradient that *is* the column sum
  of ∇X (no probe needed), compared too. The toolkit's figure for the upstream layers'
  weight gradients is recorded (``upstream``) but has no monitor counterpart: the
  monitor does not propagate ∇X noise through the upstream Jacobians.

    python benchmarks/monitor_check.py --task text --points 0,100,300 --out runs/monitor-text.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
import math
import statistics
import sys
import time

import torch

import contextlib
import dataclasses
import re

import lowbit
from lowbit import FQTConfig, GradSpec
from lowbit.analysis import gradient_variance, quantization_variance
from lowbit.analysis._model import frozen_buffers, parameter_groups, qat_of, with_config
from lowbit.experiments.tasks import make_task
from lowbit.jsonfile import dumps
from lowbit.monitor import VarianceMonitor
from lowbit.nn import fqt_blocks, fqt_layers
from lowbit.experiments.rundir import write_atomic
from lowbit.experiments.train import check_out_file


def gemm_layers_only(module: torch.nn.Module, name: str) -> bool:
    """``convert`` filter: Linear and Conv2d only. Attention (which ``convert`` also makes
    low-bit) stays in float here: its own gradient quantizers would add noise to the
    layers' gradients that neither the monitor's ∇W-path figure nor QAT removes."""
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def snapshots(task, points: list[int], seed: int, batch_size: int, lr: float) -> dict[int, dict]:
    """The model's state after each of ``points`` optimizer steps of fqt-psq-8 training."""
    torch.manual_seed(seed)
    model = lowbit.convert(task.build_model(), FQTConfig.from_recipe("fqt-psq-8", seed=seed),
                           gemm_layers_only)
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


def monitor_records(model, task, batches, cfg: FQTConfig | None) -> list[dict]:
    """The monitor's figures (``LayerVariance`` per layer) on one FQT pass of each batch
    (``cfg=None``: the layers' own configs)."""
    swap = contextlib.nullcontext() if cfg is None else with_config(model, lambda _: cfg)
    with swap, frozen_buffers(model):
        mon = VarianceMonitor(model, every=1)
        for batch in batches:
            with mon.step():
                model.zero_grad(set_to_none=True)
                task.loss(model, batch).backward()
        mon.close()
    model.zero_grad(set_to_none=True)
    return [r.layers for r in mon.history]


def _mean_se(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), statistics.stdev(vals) / math.sqrt(len(vals))


def _z(diff: float, se: float) -> float:
    return diff / se if se > 0 else (0.0 if diff == 0 else math.inf)


def _take(task, size: int, n: int, gen: torch.Generator) -> list:
    out = []
    while len(out) < n:
        for batch in task.train_batches(size, gen):
            out.append(batch)
            if len(out) == n:
                break
    return out


def check_point(model, task, point: int, a: argparse.Namespace, gen: torch.Generator) -> list[dict]:
    rows = []
    size = a.batch or task.default_batch_size
    batches = _take(task, size, a.sgd_batches, gen)
    cfg = FQTConfig(grad_input=None, grad_weight=GradSpec(8, "psq"), seed=a.seed)
    tk = gradient_variance(model, task.loss, batches, config=cfg, repeats=2, seed=a.seed)
    recs = monitor_records(model, task, batches, cfg)
    for layer in recs[0]:
        g = tk.groups[layer]
        # paired (models with BatchNorm): record k pairs batch k with batch k-1, so the odd
        # records are the disjoint, independent pairs (0,1), (2,3), ...; per-sample: all
        paired = math.isnan(recs[0][layer].sgd_w)
        m, ms = _mean_se([r[layer].sgd_w for r in (recs[1::2] if paired else recs)])
        ps = statistics.fmean(r[layer].sgd_w_samples for r in recs)
        rows.append({"point": point, "kind": "sgd", "layer": layer, "batches": len(batches),
                     "estimator": "paired" if paired else "per-sample",
                     "toolkit": g.sgd, "toolkit_se": g.sgd_se, "monitor": m, "monitor_se": ms,
                     "ratio": m / g.sgd, "z": _z(m - g.sgd, math.hypot(g.sgd_se, ms)),
                     "per_sample": ps, "per_sample_ratio": ps / g.sgd})
    batches = batches[:a.quant_batches]
    for q in [q for q in a.quantizers.split(",") if q != "none"]:
        for bits in (int(b) for b in a.bits.split(",")):
            t1 = time.time()
            cfg = FQTConfig(grad_input=None, grad_weight=GradSpec(bits, q), seed=a.seed)
            recs = monitor_records(model, task, batches, cfg)
            with with_config(model, lambda _, c=cfg: c), frozen_buffers(model):
                tks = [quantization_variance(model, task.loss, b, repeats=a.repeats) for b in batches]
            params = dict(parameter_groups(model))
            for layer in recs[0]:
                rows.append(_paired(point, q, bits, layer, "quant",
                                    [sum(t[p] for p in params[layer]) for t in tks],
                                    [r[layer].quant_w for r in recs], {"repeats": a.repeats}))
            zs = [abs(r["z"]) for r in rows if r.get("quantizer") == q and r.get("bits") == bits]
            print(f"step {point} {q}{bits}: max |z| {max(zs):.2f} ({time.time() - t1:.0f} s)",
                  file=sys.stderr, flush=True)
    return rows


@contextlib.contextmanager
def only_layer_input(model, name: str, cfg: FQTConfig):
    """Every converted layer and block exact (QAT) except ``name``, whose ∇X path runs
    ``cfg``'s and whose ∇W path is exact."""
    blocks = fqt_blocks(model)
    saved = {n: m.config for n, m in blocks.items()}
    try:
        for n, m in blocks.items():
            m.config = dataclasses.replace(cfg, grad_weight=None) if n == name else qat_of(cfg)
        yield
    finally:
        for n, m in blocks.items():
            m.config = saved[n]


class InputProbe(torch.nn.Module):
    """Zero parameters added to a layer's input: ``full`` (the input's shape, so its
    gradient is ∇X) and ``shift`` (per feature — last dim — or per channel of a 4-D conv
    input, so its gradient is ∇X's column sum)."""

    def __init__(self, shape: torch.Size, conv: bool) -> None:
        super().__init__()
        self.shape = shape
        self.full = torch.nn.Parameter(torch.zeros(shape))
        self.shift = torch.nn.Parameter(torch.zeros(shape[1] if conv else shape[-1]))
        self.view = (-1, 1, 1) if conv else (-1,)

    def hook(self, module, args):
        x = args[0]
        if x.shape != self.shape:
            raise ValueError(f"probe built for input {tuple(self.shape)}, got {tuple(x.shape)}")
        return (x + self.full + self.shift.view(self.view), *args[1:])


@contextlib.contextmanager
def probed(model, name: str, batch, task):
    """``model`` with an :class:`InputProbe` on layer ``name`` (registered as the
    submodule ``_probe`` so the toolkit sees its parameters) for the duration."""
    layer = fqt_layers(model)[name]
    shapes = []
    h = layer.register_forward_hook(lambda m, a, o: shapes.append(a[0].shape))
    with torch.no_grad(), frozen_buffers(model):
        task.loss(model, batch)
    h.remove()
    probe = InputProbe(shapes[0], isinstance(layer, torch.nn.Conv2d))
    model.add_module("_probe", probe)
    h = layer.register_forward_pre_hook(probe.hook)
    try:
        yield probe
    finally:
        h.remove()
        del model._probe
        model.zero_grad(set_to_none=True)


def natural_shift(name: str) -> str | None:
    """The parameter whose gradient is exactly the column sum of layer ``name``'s ∇X
    (TinyGPT: the bias of the LayerNorm feeding it), or None."""
    m = re.fullmatch(r"(blocks\.\d+\.)(attn\.qkv|mlp\.0)", name)
    if m:
        return m.group(1) + ("ln1" if m.group(2) == "attn.qkv" else "ln2") + ".bias"
    return "ln_f.bias" if name == "head" else None


def _paired(point, q, bits, layer, kind, tk_b, mon_b, extra) -> dict:
    d, ds = _mean_se([x - y for x, y in zip(tk_b, mon_b)])
    t, ts = _mean_se(tk_b)
    m = statistics.fmean(mon_b)
    return {"point": point, "kind": kind, "quantizer": q, "bits": bits, "layer": layer,
            "batches": len(tk_b), "toolkit": t, "toolkit_se": ts, "monitor": m,
            "ratio": m / t if t else math.nan, "diff_se": ds, "z": _z(-d, ds), **extra}


def check_input_path(model, task, point: int, a: argparse.Namespace, gen: torch.Generator,
                     rows: list[dict], save) -> None:
    """The ∇X path of each of ``--layers``, alone (module doc): appends to ``rows``,
    calls ``save()`` after each (layer, quantizer, bits)."""
    batches = _take(task, a.batch or task.default_batch_size, a.quant_batches, gen)
    for name in a.layers.split(","):
        nat = natural_shift(name)
        nat = nat if nat in dict(model.named_parameters()) else None
        with probed(model, name, batches[0], task):
            own = set(parameter_groups(model).get(name, []))
            for q in a.quantizers.split(","):
                for bits in (int(b) for b in a.bits.split(",")):
                    t1 = time.time()
                    cfg = FQTConfig(grad_input=GradSpec(bits, q), grad_weight=None, seed=a.seed)
                    with only_layer_input(model, name, cfg):
                        recs = monitor_records(model, task, batches, None)
                        tks = [quantization_variance(model, task.loss, b, repeats=a.repeats)
                               for b in batches]
                    up = [sum(v for p, v in t.items() if p != "total" and not p.startswith("_probe")
                              and p not in own) for t in tks]
                    extra = {"repeats": a.repeats, "upstream": statistics.fmean(up)}
                    mon = [r[name] for r in recs]
                    new = [_paired(point, q, bits, name, "quant_x", [t["_probe.full"] for t in tks],
                                   [v.quant_x for v in mon], extra),
                           _paired(point, q, bits, name, "quant_x_shift",
                                   [t["_probe.shift"] for t in tks], [v.quant_x_shift for v in mon], extra)]
                    if nat is not None:
                        new.append(_paired(point, q, bits, name, "quant_x_shift:" + nat,
                                           [t[nat] for t in tks], [v.quant_x_shift for v in mon], extra))
                    rows += new
                    save()
                    print(f"step {point} {name} {q}{bits}: " + ", ".join(
                        f"{r['kind']} ratio {r['ratio']:.3f} z {r['z']:.2f}" for r in new)
                        + f" ({time.time() - t1:.0f} s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="text")
    p.add_argument("--subset", type=int)
    p.add_argument("--points", default="0,100,300")
    p.add_argument("--train-batch", type=int, help="training batch (default: the task's)")
    p.add_argument("--batch", type=int, help="measurement minibatch (default: the task's)")
    p.add_argument("--sgd-batches", type=int, default=48)
    p.add_argument("--quant-batches", type=int, default=12)
    p.add_argument("--repeats", type=int, default=6, help="FQT draws per quantization batch")
    p.add_argument("--quantizers", default="ptq,psq,bhq", help="quantizers to check, or none (∇W path)")
    p.add_argument("--path", choices=("grad_weight", "grad_input"), default="grad_weight",
                   help="grad_weight: minibatch and ∇W-path figures; grad_input: the ∇X path of --layers")
    p.add_argument("--layers", help="--path grad_input: comma-separated layer names (not the first layer)")
    p.add_argument("--bits", default="4,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.out:  # checked before the measurement, not after it
        check_out_file("--out", a.out)
    if a.path == "grad_input" and not a.layers:
        p.error("--path grad_input needs --layers")
    torch.set_num_threads(a.threads)
    task = make_task(a.task, subset=a.subset)
    points = [int(s) for s in a.points.split(",")]
    t0 = time.time()
    snaps = snapshots(task, points, a.seed, a.train_batch or task.default_batch_size,
                      task.default_lr)
    print(f"trained to {points} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    torch.manual_seed(a.seed)
    model = lowbit.convert(task.build_model(), FQTConfig.from_recipe("fqt-psq-8", seed=a.seed),
                           gemm_layers_only)
    gen = torch.Generator().manual_seed(a.seed + 1)
    results = []

    def save() -> None:
        write_atomic(Path(a.out), dumps({"args": vars(a), "rows": results,  # valid JSON (a review)
                                         "seconds": time.time() - t0}, indent=1))

    for point in points:
        model.load_state_dict(snaps[point])
        model.train()
        if a.path == "grad_input":
            check_input_path(model, task, point, a, gen, results, save)
            continue
        results += check_point(model, task, point, a, gen)
        sgd = [abs(r["z"]) for r in results if r["point"] == point and r["kind"] == "sgd"]
        print(f"step {point} sgd: max |z| {max(sgd):.2f}", file=sys.stderr, flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
