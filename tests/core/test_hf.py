"""Hugging Face models under lowbit.convert (issue 13, item 4): Conv1D is a Linear with
the transposed weight, attention runs through lowbit's via transformers' registry, every
training GEMM of GPT-2 / Llama / BERT runs low-bit, and the converted models still train,
generate, checkpoint activations, run under the Trainer, save and load into the
unconverted classes. Skipped without transformers (an optional dependency)."""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import FQTConfig, FQTLinear

T = pytest.importorskip("transformers")
from lowbit import hf  # noqa: E402  (needs transformers)

FQT = FQTConfig.from_recipe("fqt-psq-8", seed=0)
VOCAB, LEN = 64, 12


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                          n_positions=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def llama() -> nn.Module:  # grouped-query attention: 4 query heads, 2 key/value heads
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
        eos_token_id=0, pad_token_id=0))


def bert() -> nn.Module:
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=32, num_labels=2, pad_token_id=0))


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert}


def batch(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, LEN), generator=g)
    mask = torch.ones(2, LEN, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second sequence
    labels = torch.tensor([0, 1]) if name == "bert" else ids
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def convert(model: nn.Module, config: FQTConfig = FQT, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", lowbit.ConversionWarning)  # nothing may be left float
        return lowbit.convert(model, config, report=True, **kw)


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(hf.CHILD)}


# -- Conv1D -------------------------------------------------------------------------------------
def test_conv1d_is_a_linear_with_the_transposed_weight() -> None:
    torch.manual_seed(0)
    conv = T.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs, weight (4, 6)
    nn.init.normal_(conv.bias)
    lin = nn.Linear(4, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    a = hf.FQTConv1D.from_float(conv, FQT, seed=0, name="c")
    b = FQTLinear.from_float(lin, FQT, seed=0, name="c")
    assert a.weight is conv.weight and tuple(a.weight.shape) == (4, 6)
    assert list(a.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 5, 4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    w = torch.randn(3, 5, 6)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    # the same GEMMs on the same codes and the same noise stream: bit for bit
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(conv.weight.grad, lin.weight.grad.t()) and torch.equal(conv.bias.grad, lin.bias.grad)


# -- convert: coverage, training ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_runs_every_training_gemm_low_bit(name: str) -> None:
    float_model = MODELS[name]()
    keys = list(float_model.state_dict())
    model, report = convert(copy.deepcopy(float_model))
    assert report.skipped == {} and model.config._attn_implementation == hf.IMPLEMENTATION
    assert list(model.state_dict()) == keys
    blocks = attention_blocks(model)
    assert len(blocks) == 2 and all(n in report.converted for n in blocks)
    assert all(type(m) is lowbit.FQTScaledDotProductAttention for m in blocks.values())
    if name == "gpt2":
        assert sum(type(m) is hf.FQTConv1D for m in model.modules()) == 8
    rep = lowbit.coverage(model, model_kwargs=batch(name))
    assert rep.float_share == 0.0 and rep.lowbit_share == 1.0, rep.table(by="type")  # target: ≥ 99%
    assert rep.flops("simulated") > 0 and rep.never_called == ()


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_train_save_load_into_the_unconverted_class(name: str, tmp_path) -> None:
    model, _ = convert(MODELS[name]())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(**batch(name)).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(m.noise.counter == 3 for m in attention_blocks(model).values())
    model.save_pretrained(tmp_path)
    loaded = type(MODELS[name]()).from_pretrained(tmp_path)
    assert loaded.config._attn_implementation != hf.IMPLEMENTATION  # the choice is not saved
    assert not any(isinstance(m, (FQTLinear, hf.FQTConv1D)) for m in loaded.modules())
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    plain = MODELS[name]()
    plain.load_state_dict(mine)  # strict: the same keys and layouts ((in, out) for Conv1D)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_runs_the_quantized_attention(name: str) -> None:
    model, _ = convert(MODELS[name]())
    model.eval()
    for m in attention_blocks(model).values():
        m.ran = False
    b = batch(name)
    out = model.generate(b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=4,
                         do_sample=False)
    again = model.generate(b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=4,
                           do_sample=False)
    assert out.shape == (2, LEN + 4) and torch.equal(out, again)
    assert torch.equal(out[:, :LEN], b["input_ids"])
    assert all(m.ran for m in attention_blocks(model).values())


@pytest.mark.parametrize("name", list(MODELS))
def test_activation_checkpointing_gives_the_same_step(name: str) -> None:
    model, _ = convert(MODELS[name]())
    ckpt = copy.deepcopy(model)  # the same noise streams
    enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
    enable()
    grads = []
    for m in (model, ckpt):
        m.train()
        torch.manual_seed(3)  # the same dropout masks (checkpointing replays the RNG)
        m(**batch(name)).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert list(grads[0]) == list(grads[1])
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert all(m.noise.counter == 1 for m in attention_blocks(ckpt).values())


def test_trainer_trains_the_converted_model(tmp_path) -> None:
    model, _ = convert(gpt2())
    data = [{k: v[i] for k, v in batch("gpt2", seed=s).items()} for s in range(3) for i in range(2)]
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                               learning_rate=1e-3, logging_steps=1, save_strategy="no",
                               report_to=[], use_cpu=True, dataloader_num_workers=0)
    trainer = T.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert all(m.noise.counter == 3 for m in attention_blocks(model).values())


# -- what stays float, and why ---------------------------------------------------------------------
def test_filter_keeps_attention_float() -> None:
    model, report = convert(gpt2(), module_filter=lambda m, n: not n.endswith(hf.CHILD))
    assert set(report.excluded) == set(attention_blocks(model))
    rep = lowbit.coverage(model, model_kwargs=batch("gpt2"))
    reasons = rep.float_reasons()
    assert {g["module_type"] for g in reasons} == {"ScaledDotProductAttention"}
    assert rep.flops("simulated") == 0 and 0 < rep.float_share < 0.2


def test_attention_registry_without_convert_raises() -> None:
    model = gpt2()
    model.set_attn_implementation(hf.IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="^attn_implementation='lowbit' reached a GPT2Attention "
                       "without a 'lowbit_attention' child: run lowbit.convert"):
        model(**batch("gpt2"))


def test_converting_part_of_a_model_says_why_attention_stays_float() -> None:
    model = gpt2()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _, report = lowbit.convert(model.transformer.h[0], FQT, report=True)
    assert list(report.skipped) == ["attn"]
    assert report.skipped["attn"].startswith("transformers picks this module's attention by the "
                                             "config of its PreTrainedModel")


def test_lowbit_imports_and_converts_without_transformers() -> None:
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import lowbit\n"
            "from lowbit.experiments.models import TinyGPT\n"
            "m = lowbit.convert(TinyGPT(block_size=8, n_layer=1, n_head=2, n_embd=16), "
            "lowbit.FQTConfig.from_recipe('fqt-psq-8'))\n"
            "print(type(m.blocks[0].attn.sdpa).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "FQTScaledDotProductAttention"


def test_every_converted_block_reports_whether_it_ran_and_the_monitor_names_what_it_skips() -> None:
    """GPT-2's Conv1D layers and its attention are converted blocks like any Linear: they
    are listed by ``fqt_layers`` and set and clear their ``ran`` flags; the variance
    monitor drives the Conv1D layers and names the attention products, which it cannot
    drive, in ``skipped`` (it used to see only the LM head and report nothing skipped)."""
    model, _ = convert(gpt2())
    layers = lowbit.fqt_layers(model)
    conv1d = {n for n, m in layers.items() if isinstance(m, hf.FQTConv1D)}
    assert len(conv1d) == 8 and set(attention_blocks(model)) <= set(layers)
    assert set(layers) == set(lowbit.fqt_blocks(model))  # no in-projection alternatives in GPT-2
    model(**batch("gpt2"))
    assert lowbit.fqt_layers(model, ran=False) == {}
    lowbit.reset_ran(model)
    assert set(lowbit.fqt_layers(model, ran=False)) == set(layers)
    from lowbit.monitor import VarianceMonitor

    mon = VarianceMonitor(model, every=1)
    assert set(mon.layers) == conv1d | {"lm_head"}
    assert set(mon.skipped) == set(attention_blocks(model))
    assert all("the monitor knows Linear (Hugging Face Conv1D) and Conv2d GEMMs only" in why
               for why in mon.skipped.values())


def test_the_monitor_measures_a_conv1d_as_the_linear_it_computes() -> None:
    """A Conv1D (weight (in, out)) under the variance monitor gives the figures of an
    ``FQTLinear`` with weight ``Wᵀ``, the same input, gradient and noise stream: the
    quantization and minibatch variances of both paths, to float rounding."""
    from lowbit.monitor import VarianceMonitor

    torch.manual_seed(0)
    conv = T.pytorch_utils.Conv1D(6, 5)  # nf = 6 outputs, nx = 5 inputs
    lin = nn.Linear(5, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    records = []
    for m in (conv, lin):
        model, _ = convert(nn.Sequential(m), FQTConfig.from_recipe("fqt-psq-8", seed=3))
        mon = VarianceMonitor(model, every=1)
        assert set(mon.layers) == {"0"} and not mon.skipped
        x = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()  # ∇X path too
        with mon.step():
            model(x).square().sum().backward()
        records.append(mon.history[-1].layers["0"])
    a, b = (dataclasses.asdict(r) for r in records)
    assert a.keys() == b.keys()
    assert all(math.isfinite(a[k]) and a[k] > 0 for k in ("quant_w", "quant_x", "sgd_w", "sgd_x"))
    for key in a:
        if isinstance(a[key], float) and not math.isnan(a[key]):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        else:
            assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key
