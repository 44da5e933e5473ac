"""Minibatches and the QAT warm-up of ``lowbit variance`` (:mod:`lowbit.commands.variance`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.analysis._model import LossFn, progress_bar
from lowbit.experiments import data as D

if TYPE_CHECKING:  # pragma: no cover
    from .variance_args import Options

TEXT_BLOCK = 64  # tokens per window


def image_loss(model: nn.Module, batch: object) -> torch.Tensor:
    x, y = batch  # (B, 1, H, W), (B,)
    return F.cross_entropy(model(x), y)


def text_loss(model: nn.Module, batch: object) -> torch.Tensor:
    x, y = batch  # (B, T), (B, T)
    return model(x, y)[1]


class Data:
    """Minibatches of the task: ``train(gen)`` for the warm-up, ``study(n)`` for the study."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        if opts.task == "text":
            corpus, self.source = D.load_text_corpus(max_bytes=opts.subset)
            self.tokens, _ = D.split_text(corpus)
            self.loss: LossFn = text_loss
            return
        if opts.task == "digits":
            d = D.load_digits_tensors(seed=opts.seed)
            x, y = d.x_train, d.y_train
            if opts.subset is not None:
                x, y = x[: opts.subset], y[: opts.subset]
            self.source = "sklearn digits"
        else:
            d = D.load_fashion_mnist(subset=opts.subset, seed=opts.seed)
            x, y = d.x_train, d.y_train
            self.source = f"fashion-mnist ({len(y)} training images)"
        self.x, self.y = x, y
        self.loss = image_loss

    def _window(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return D.text_batches(self.tokens, TEXT_BLOCK, self.opts.batch_size, gen)

    def train(self, steps: int, gen: torch.Generator):
        """``steps`` training minibatches (an epoch's random order, then the next; text:
        random windows). ``ValueError`` where not one minibatch fits the examples loaded
        (it looped for ever)."""
        bs = self.opts.batch_size
        if steps > 0 and self.opts.task != "text" and bs > len(self.y):
            raise ValueError(f"--batch-size {bs} exceeds the {len(self.y)} training examples loaded: "
                             "no training minibatch fits (raise --subset or lower --batch-size)")
        done = 0
        while done < steps:
            if self.opts.task == "text":
                yield self._window(gen)
                done += 1
                continue
            order = torch.randperm(len(self.y), generator=gen)
            for i in range(0, len(order) - bs + 1, bs):
                if done == steps:
                    return
                idx = order[i:i + bs]
                yield self.x[idx], self.y[idx]
                done += 1

    def study(self, n: int, gen: torch.Generator) -> list[object]:
        """``n`` disjoint random minibatches (text: random windows)."""
        bs = self.opts.batch_size
        if self.opts.task == "text":
            return [self._window(gen) for _ in range(n)]
        if n * bs > len(self.y):
            raise ValueError(f"--batches × --batch-size = {n * bs} exceeds the {len(self.y)} "
                             "training examples loaded (raise --subset or lower them)")
        order = torch.randperm(len(self.y), generator=gen)
        return [(self.x[order[i * bs:(i + 1) * bs]], self.y[order[i * bs:(i + 1) * bs]])
                for i in range(n)]


def warmup(model: nn.Module, data: Data, opts: Options, gen: torch.Generator) -> dict:
    """``train_steps`` QAT steps (SGD momentum 0.9 for images, AdamW for text)."""
    if opts.train_steps == 0:
        return {"steps": 0}
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.task == "text":
        opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    bar = progress_bar(opts.train_steps, "QAT warm-up", opts.progress)
    for batch in data.train(opts.train_steps, gen):
        opt.zero_grad(set_to_none=True)
        loss = data.loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
    bar.close()
    opt.zero_grad(set_to_none=True)
    return {"steps": len(losses), "lr": opts.lr, **loss_trend(losses)}


def loss_trend(losses: list[float]) -> dict:
    """``loss_first``/``loss_last``: the mean loss of the first and of the last ``window``
    steps, ``window = min(10, ⌊steps/2⌋)`` (at least 1) so that the two never share a step
    (10 steps averaged twice used to print "2.287 → 2.287"); NaN without steps."""
    k = max(1, min(10, len(losses) // 2))
    if not losses:
        return {"loss_first": float("nan"), "loss_last": float("nan"), "window": 0}
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "window": k}


def describe_warmup(w: dict) -> str:
    """The warm-up as a line of the summaries: steps, lr, loss trend."""
    if not w.get("steps"):
        return "none (the model as initialised)"
    lr = f" at lr {w['lr']:g}" if "lr" in w else ""
    return (f"{w['steps']} QAT steps{lr}, loss {w['loss_first']:.3f} → {w['loss_last']:.3f} "
            f"(means of the first and last {w.get('window', 10)} steps)")



__all__ = ["Data", "warmup"]
