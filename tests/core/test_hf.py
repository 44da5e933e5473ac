"""Hugging Face models under lowbit.convert (issue 13, item 4): Conv1D is a Linear with
the transposed weight, attention runs through lowbit's via transformers' registry, every
training GEMM of GPT-2 / Llama / BERT runs low-bit, and the converted models still train,
generate, checkpoint activations, run under the Trainer, save and load into the
unconverted classes. Skipped without transformers (an optional dependency)."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
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
    """Attention the filter turns down is not switched: its children go, the model keeps its
    own attention implementation (torch's SDPA here), and its products run float."""
    float_model = gpt2()
    impl = float_model.config._attn_implementation
    model, report = convert(copy.deepcopy(float_model), module_filter=lambda m, n: not n.endswith(hf.CHILD))
    assert set(report.excluded) == {f"transformer.h.{i}.attn.{hf.CHILD}" for i in range(2)}
    assert attention_blocks(model) == {} and model.config._attn_implementation == impl != hf.IMPLEMENTATION
    rep = lowbit.coverage(model, model_kwargs=batch("gpt2"))
    reasons = rep.float_reasons()
    assert {g["module_type"] for g in reasons} == {"GPT2Attention"}
    assert rep.flops("simulated") == 0 and 0 < rep.float_share < 0.2


def test_filter_turning_down_the_attention_module_keeps_its_products_float() -> None:
    """A filter rejecting the attention module itself (not its ``lowbit_attention``
    child) converted the products anyway, though convert read that filter as keeping them
    float when it decided what to list (a review): the attention stays float, its
    projections convert, ``excluded`` names the attention modules."""
    float_model = gpt2()
    attn = type(float_model.transformer.h[0].attn)
    model, report = convert(copy.deepcopy(float_model), module_filter=lambda m, n: not isinstance(m, attn))
    assert set(report.excluded) == {f"transformer.h.{i}.attn" for i in range(2)}
    assert attention_blocks(model) == {} and model.config._attn_implementation != hf.IMPLEMENTATION
    assert "transformer.h.0.attn.c_attn" in report.converted


def test_attention_the_filter_turns_down_is_not_listed_as_skipped() -> None:
    """Attention that must stay float (GPT-OSS's sinks) was listed in ``skipped`` (and
    the warning) even when the user's ``module_filter`` had turned it down: a filter that
    keeps attention float, by the module or by its ``lowbit_attention`` child, hears
    nothing about it; without the filter it is listed."""
    for keep_float in (lambda m, n: isinstance(m, nn.Linear), lambda m, n: not n.endswith(hf.CHILD)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", lowbit.ConversionWarning)
            _, report = lowbit.convert(gpt_oss(), FQT, module_filter=keep_float, report=True)
        assert not any("sinks" in why for why in report.skipped.values())
    _, report, _ = convert_warned(gpt_oss())
    assert sum("sinks" in why for why in report.skipped.values()) == len(self_attention(gpt_oss()))


def test_convert_leaves_a_model_sharing_the_config_as_it_was() -> None:
    """transformers shares one config object between models built from it; ``convert``
    switched that object's attention implementation, so the other (never converted) model
    then raised at its next forward. The converted model now switches its own copy (its
    modules still share one), and the other keeps its implementation and logits."""
    conf = T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    a, b = T.GPT2LMHeadModel(conf), T.GPT2LMHeadModel(conf).eval()
    assert a.config is b.config
    impl, ids = b.config._attn_implementation, batch("gpt2")["input_ids"]
    with torch.no_grad():
        before = b(ids).logits
    a, _ = convert(a)
    assert a.config is not b.config and a.config._attn_implementation == hf.IMPLEMENTATION
    assert all(m.config is a.config for m in a.modules() if "config" in m.__dict__)
    assert b.config._attn_implementation == impl != hf.IMPLEMENTATION
    with torch.no_grad():
        assert torch.equal(b(ids).logits, before)
    assert attention_blocks(a) and a(ids).logits.shape == before.shape


def test_converting_nothing_leaves_the_model_as_it_was() -> None:
    """A filter that converts nothing changes nothing: an eager GPT-2 keeps
    ``attn_implementation="eager"``, its logits and its ``output_attentions``."""
    torch.manual_seed(0)
    float_model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                                 n_positions=32, attn_implementation="eager")).eval()
    model, report = convert(copy.deepcopy(float_model), module_filter=lambda m, n: False)
    assert report.converted == () and report.skipped == {}
    assert model.config._attn_implementation == "eager" and attention_blocks(model) == {}
    b = batch("gpt2")
    with torch.no_grad():
        ref = float_model(b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True)
        out = model(b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True)
    assert torch.equal(out.logits, ref.logits)
    assert len(out.attentions) == 2 and all(torch.equal(a, r) for a, r in zip(out.attentions, ref.attentions))


def test_only_the_config_whose_attention_converts_is_switched() -> None:
    """T5's encoder and decoder stacks have configs of their own: with the decoder's attention
    turned down by the filter, only the encoder runs lowbit attention; the decoder keeps its
    implementation and no children."""
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                                    num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0))
    impl = model.decoder.config._attn_implementation
    model, report = convert(model, module_filter=lambda m, n: not (n.startswith("decoder.") and n.endswith(hf.CHILD)))
    assert model.encoder.config._attn_implementation == hf.IMPLEMENTATION
    assert model.decoder.config._attn_implementation == impl != hf.IMPLEMENTATION
    assert set(attention_blocks(model)) == {f"encoder.block.0.layer.0.SelfAttention.{hf.CHILD}"}
    ids = batch("t5")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(m.ran for m in attention_blocks(model).values())


def test_attention_registry_without_convert_raises() -> None:
    model = gpt2()
    model.set_attn_implementation(hf.IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="^attn_implementation='lowbit' reached a GPT2Attention "
                       "without a 'lowbit_attention' child: run lowbit.convert"):
        model(**batch("gpt2"))


def test_a_float_model_built_from_a_converted_config_is_told_how_to_run() -> None:
    """``GPT2LMHeadModel(converted.config)`` shares the converted model's config (which
    says "lowbit"): its first forward raised an error whose only remedy was convert (a
    review); the message names the float way, and the way does not touch the converted
    model's attention."""
    import copy

    converted = lowbit.convert(gpt2(), FQT)
    fresh = T.GPT2LMHeadModel(converted.config)
    with pytest.raises(RuntimeError, match=r"build it from a copy set back to torch's attention: "
                       r"c = copy\.deepcopy\(config\); c\._attn_implementation = 'sdpa'"):
        fresh(**batch("gpt2"))
    c = copy.deepcopy(converted.config)
    c._attn_implementation = "sdpa"  # (a review: a class whose source transformers cannot read
    fresh = T.GPT2LMHeadModel(c)     # declines set_attn_implementation; the config setter works)
    fresh(**batch("gpt2"))
    assert converted.config._attn_implementation == hf.IMPLEMENTATION


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


# -- attention lowbit cannot compute stays float, and says so ----------------------------------
def gpt_oss() -> nn.Module:  # attention sinks; transformers: _supports_sdpa = False
    torch.manual_seed(0)
    model = T.GptOssForCausalLM(T.GptOssConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, num_local_experts=2,
        num_experts_per_tok=1, max_position_embeddings=32, sliding_window=4,
        attn_implementation="eager", pad_token_id=0))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "sinks"):
                m.sinks.normal_(0, 3.0)  # trained sinks are far from zero
    return model.eval()


def gemma2(softcap: float | None = 50.0) -> nn.Module:  # attention logit softcapping
    torch.manual_seed(0)
    return T.Gemma2ForCausalLM(T.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=32,
        sliding_window=4, attn_logit_softcapping=softcap, attn_implementation="eager",
        pad_token_id=0)).eval()


def convert_warned(model: nn.Module, config: FQTConfig = FQT):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = lowbit.convert(model, config, report=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, lowbit.ConversionWarning)]
    assert len(messages) == 1
    return model, report, messages[0]


def self_attention(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if hf.calls_attention_interface(type(m))]


@pytest.mark.parametrize(("make", "why"), [
    (gpt_oss, "asks its attention function for attention sinks (s_aux)"),
    (gemma2, "asks its attention function for attention logit softcapping (softcap)"),
    (lambda: gemma2(None), "Gemma2Model does not support torch's scaled_dot_product_attention "
                           "(_supports_sdpa = False)")], ids=["gpt-oss-sinks", "gemma2-softcap", "gemma2-no-sdpa"])
def test_attention_lowbit_cannot_compute_stays_float_and_is_reported(make, why: str) -> None:
    """GPT-OSS passes attention sinks, Gemma2 softcapping to the attention function, and
    transformers marks both models as not running SDPA: convert leaves their attention on
    the implementation it had (eager), without children, lists every attention module in
    ``skipped`` and the warning, and the model computes what the float one does (the fp
    recipe: bit for bit) with gradients reaching the sinks."""
    float_model = make()
    names = self_attention(float_model)
    model, report, message = convert_warned(copy.deepcopy(float_model), FQTConfig.from_recipe("fp"))
    assert len(names) == 2 and set(report.skipped) == set(names)
    assert all(why in report.skipped[n] and "stays float ('eager' attention)" in report.skipped[n]
               for n in names)
    assert all(f"'{n}': {report.skipped[n]}" in message for n in names)  # quoted, as every module
    assert model.config._attn_implementation == "eager" and attention_blocks(model) == {}
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, float_model(ids).logits)
    model.train()
    model(ids, labels=ids).loss.backward()
    sinks = [m.sinks for m in model.modules() if hasattr(m, "sinks")]
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sinks)


def test_sinks_under_a_low_bit_recipe_still_stay_float() -> None:
    model, report, _ = convert_warned(gpt_oss())
    assert set(report.skipped) == set(self_attention(model))
    assert model.config._attn_implementation == "eager"
    assert any(isinstance(m, FQTLinear) for m in model.modules())  # the projections are converted


def test_unsupported_features_read_the_module_and_its_config() -> None:
    assert hf.unsupported_features(gpt_oss().model.layers[0].self_attn) == ["attention sinks (s_aux)"]
    assert hf.unsupported_features(gemma2().model.layers[0].self_attn) == ["attention logit softcapping (softcap)"]
    assert hf.unsupported_features(gemma2(None).model.layers[0].self_attn) == []  # softcap=None passed
    assert hf.unsupported_features(llama().model.layers[0].self_attn) == []


def attention_call(**kwargs):
    """One attention call of a converted Llama layer (4 query, 2 key/value heads) through
    lowbit's attention function, and torch's SDPA on the same inputs."""
    model, _ = convert(llama())
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))
    out, weights = hf.lowbit_attention_forward(attn, q, k, v, None, scaling=0.5, **kwargs)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    return out, weights, ref.transpose(1, 2)


def test_attention_call_honours_or_ignores_what_every_model_passes() -> None:
    out, weights, ref = attention_call(
        position_ids=torch.arange(5)[None], sliding_window=None, use_cache=True, output_attentions=False,
        cu_seq_lens_q=None, cache_position=torch.arange(5), is_causal=True, softcap=None, s_aux=None)
    assert weights is None and out.shape == ref.shape == (2, 5, 4, 8)
    assert (out - ref).norm() / ref.norm() < 0.05  # 8-bit products


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"s_aux": torch.zeros(4)}, "s_aux (attention sinks)"),
    ({"sinks": torch.zeros(4)}, "sinks (attention sinks)"),
    ({"softcap": 50.0}, "softcap (attention logit softcapping)"),
    ({"future_feature": 1}, "future_feature (transformers sdpa honours it, lowbit does not yet)")])
def test_attention_call_with_an_argument_it_cannot_honour_raises(kwargs, named: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf, "SDPA_ONLY_KWARGS", {"future_feature"})  # as if sdpa named it
    with pytest.raises(ValueError, match=rf"^lowbit attention cannot honour what LlamaAttention passes "
                                         rf"to its attention function: {re.escape(named)};"):
        attention_call(**kwargs)


def test_attention_ignores_what_sdpa_ignores() -> None:
    """A keyword transformers' sdpa does not name reaches the attention function from the
    model's ``**kwargs`` (``token_type_ids`` from a tokenizer's output, on Llama): sdpa
    ignores it, and so does lowbit (it raised "not known to lowbit")."""
    out, _, ref = attention_call(future_feature=1)
    assert (out - ref).norm() / ref.norm() < 0.05
    ids = batch("llama")["input_ids"]
    model, _ = convert(MODELS["llama"]().eval(), FQTConfig.from_recipe("fp"))
    float_model = MODELS["llama"]().eval()
    with torch.no_grad():
        got = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        want = float_model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
    torch.testing.assert_close(got, want)


# -- output_attentions --------------------------------------------------------------------------
def eager_attentions(model: nn.Module, **kw) -> tuple[torch.Tensor, ...]:
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        return ref(**kw, output_attentions=True).attentions


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_output_attentions_returns_the_attention_weights(name: str) -> None:
    """``output_attentions=True`` on a converted model gives the weights (B, H, L, S) of
    lowbit's attention: under fp8-class 8-bit codes close to eager float attention's, zero
    where the mask (causal, padding) excludes a key, rows summing to 1; under the fp recipe,
    eager's to float rounding. (GPT-2 records them by hooks, Llama passes the flag down.)"""
    b = batch(name)
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    float_model = MODELS[name]().eval()
    ref = eager_attentions(float_model, **kw)
    heads = 4 if name == "llama" else 2
    valid = b["attention_mask"].bool() if name != "bert" else torch.ones(2, LEN, dtype=torch.bool)
    for config, tol in ((FQT, 0.05), (FQTConfig.from_recipe("fp"), 1e-5)):
        model, _ = convert(copy.deepcopy(float_model), config)
        with torch.no_grad():
            out = model(**kw, output_attentions=True)
        assert len(out.attentions) == 2
        for got, want in zip(out.attentions, ref):
            assert got.shape == want.shape == (2, heads, LEN, LEN)
            # rows of padding queries: eager spreads a fully masked row evenly, SDPA gives 0
            got, want = got.transpose(1, 2)[valid], want.transpose(1, 2)[valid]  # (rows, H, S)
            assert torch.equal(got == 0, want == 0)  # the same keys excluded
            assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5)
            assert (got - want).abs().max() < tol


def test_output_attentions_of_float_children_beside_converted_ones() -> None:
    """In a switched model, attention the filter keeps float (a float child: torch SDPA) gives
    its weights too, computed in float as eager does."""
    float_model = gpt2().eval()
    b = batch("gpt2")
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    ref = eager_attentions(float_model, **kw)
    model, _ = convert(copy.deepcopy(float_model), module_filter=lambda m, n: not n.startswith("transformer.h.0."))
    assert model.config._attn_implementation == hf.IMPLEMENTATION
    assert type(model.transformer.h[0].attn.lowbit_attention) is lowbit.attention_modules.ScaledDotProductAttention
    with torch.no_grad():
        out = model(**kw, output_attentions=True)
    valid = b["attention_mask"].bool()  # queries that are not padding (fully masked rows)
    got, want = (torch.stack(a).transpose(2, 3)[:, valid] for a in (out.attentions, ref))
    assert (got[0] - want[0]).abs().max() < 1e-5  # float (its inputs too: layer 0 all float)
    assert 0 < (got[1] - want[1]).abs().max() < 0.05  # low-bit


# -- attention computed by the model's own code --------------------------------------------------
def deberta_v2() -> nn.Module:
    torch.manual_seed(0)
    return T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, num_labels=2))


def xlnet() -> nn.Module:
    torch.manual_seed(0)
    return T.XLNetLMHeadModel(T.XLNetConfig(d_model=32, d_inner=64, n_layer=2, n_head=2, vocab_size=VOCAB))


@pytest.mark.parametrize(("make", "names", "cls"), [
    (deberta_v2, [f"deberta.encoder.layer.{i}.attention.self" for i in range(2)], "DisentangledSelfAttention"),
    (xlnet, [f"transformer.layer.{i}.rel_attn" for i in range(2)], "XLNetRelativeAttention")],
    ids=["deberta-v2", "xlnet"])
def test_attention_outside_the_registry_is_reported(make, names: list[str], cls: str) -> None:
    """DeBERTa-v2 and XLNet compute attention with their own matmuls, never through
    transformers' attention registry: convert lists each such module (the innermost one named
    like attention) in ``skipped`` and the warning, converts their Linear layers, and leaves
    the implementation alone."""
    model, report, message = convert_warned(make())
    assert list(report.skipped) == names
    why = (f"{cls} computes attention with its own code, not through transformers' attention "
           "interface (ALL_ATTENTION_FUNCTIONS)")
    assert all(report.skipped[n].startswith(why) and n in message for n in names)
    assert attention_blocks(model) == {} and model.config._attn_implementation != hf.IMPLEMENTATION
    assert any(isinstance(m, FQTLinear) for m in model.modules())


def test_a_whole_converted_model_unpickles_in_a_new_process(tmp_path) -> None:
    """``torch.save`` of a whole converted Llama (no Conv1D, whose class imports lowbit.hf),
    ``torch.load`` in a fresh process: its attention implementation "lowbit" is registered
    again (it raised KeyError "'lowbit' is not a valid attention implementation")."""
    import subprocess
    import sys

    model, _ = convert(MODELS["llama"]().eval(), FQTConfig.from_recipe("fp"))
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.save({"model": model, "ids": ids, "want": want}, tmp_path / "whole.pt")
    code = ("import torch\n"
            f"d = torch.load({str(tmp_path / 'whole.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n"
            "    got = d['model'](input_ids=d['ids']).logits\n"
            "torch.testing.assert_close(got, d['want'])\n"
            "print('ok', d['model'].config._attn_implementation)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["ok", "lowbit"]


def test_dropped_queries_keep_causality_under_lowbit() -> None:
    """Gemma 4 drops query tokens before its KV-shared layers (``logits_to_keep``) where
    the mask builder returned ``None`` for causal attention — a case transformers guards only
    for the name "sdpa": under "lowbit" the kept rows attended upper-left (0.31 off). The
    mask is always built now: the fp recipe gives the float model's logits."""
    if not hasattr(T, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma 4")
    torch.manual_seed(0)
    cfg = T.Gemma4TextConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=16,
        vocab_size_per_layer_input=100, hidden_size_per_layer_input=8, num_kv_shared_layers=2,
        sliding_window=64, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * 2)
    base = T.Gemma4ForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    model, _ = convert(copy.deepcopy(base), FQTConfig.from_recipe("fp"))
    assert model.config._attn_implementation == hf.IMPLEMENTATION
    with torch.no_grad():
        want = base(input_ids=ids).logits[:, -2:]
        got = model(input_ids=ids, logits_to_keep=2).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_resized_vocabulary_restarts_the_heads_predicted_ranges() -> None:
    """``resize_token_embeddings`` on a tied GPT-2 under a predicted-range recipe: the LM
    head's per-row range history describes the old vocabulary; it restarts with a warning
    (a shape error from the kernel before)."""
    model, _ = convert(gpt2(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    ids = batch("gpt2")["input_ids"]
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)  # the old gradients have the old shape (as in float)
    model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    with pytest.warns(RuntimeWarning, match="its range history restarts"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_draws_nothing_from_the_global_random_stream_even_the_first_time(name: str) -> None:
    """The first conversion in a process builds the probes of the attribute check
    (transformers' ``Conv1D(1, 1)`` initializes its weight with ``torch.normal``): that
    moved torch's global generator, so two seeded GPT-2 runs in one process differed (a
    review). The probes' cache is cleared to make this conversion the first."""
    from lowbit import conversion

    model = MODELS[name]()
    conversion._plain_keys.cache_clear()
    before = torch.random.get_rng_state()
    lowbit.convert(model, FQT)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_attention_of_a_users_model_is_routed() -> None:
    """An attention module of a user's ``PreTrainedModel`` (or of ``trust_remote_code``,
    module ``transformers_modules.…``: the same reading) that calls
    ``ALL_ATTENTION_FUNCTIONS`` as transformers' own do: its products stayed float, neither
    converted nor listed in the report (only transformers' classes were read: a review).
    Now routed, converted, and every GEMM of the step low-bit."""
    class Attn(nn.Module):
        def __init__(self, config) -> None:  # noqa: ANN001
            super().__init__()
            self.config, self.is_causal, self.qkv = config, True, nn.Linear(32, 96)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).view(2, 12, 3, 2, 16).permute(2, 0, 3, 1, 4)
            attend = T.modeling_utils.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            o, _ = attend(self, q, k, v, None, scaling=0.25)
            return o.reshape(2, 12, 32)

    class Model(T.PreTrainedModel):
        config_class = T.PretrainedConfig
        _supports_sdpa = True

        def __init__(self, config) -> None:  # noqa: ANN001
            super().__init__(config)
            self.attn, self.head = Attn(config), nn.Linear(32, 4)
            self.post_init()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x))

    torch.manual_seed(0)
    model, report = lowbit.convert(Model(T.PretrainedConfig(attn_implementation="sdpa")), FQT, report=True)
    assert report.skipped == {} and model.config._attn_implementation == hf.IMPLEMENTATION
    assert isinstance(model.attn.get_submodule(hf.CHILD), lowbit.FQTScaledDotProductAttention)
    assert lowbit.coverage(model, torch.randn(2, 12, 32)).lowbit_share == 1.0


def test_a_conv1d_subclass_is_named_by_its_own_module() -> None:
    """transformers' ``Conv1D`` is not torch's: a subclass was reported as a "subclass of
    nn.Conv1D" (a review)."""
    from transformers.pytorch_utils import Conv1D

    class MyConv1D(Conv1D):
        pass

    with pytest.warns(lowbit.ConversionWarning):
        _, report = lowbit.convert(nn.Sequential(MyConv1D(4, 3)), FQT, report=True)
    assert report.skipped["0"].endswith("MyConv1D is a subclass of transformers.pytorch_utils.Conv1D: its own "
                                        "forward, parameters or state would be lost")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_a_users_module_named_attention_that_multiplies_no_activations_is_not_listed() -> None:
    """A squeeze-and-excitation ``ChannelAttention`` (pooling, an MLP, a sigmoid) or a
    ``PreAttnNorm`` in a user's ``PreTrainedModel`` was listed as attention computed with
    its own code, float (a review); a user's class that does compute scores
    (``torch.matmul``, ``softmax``, ``@``, in a helper function of its module) still is:
    a name test alone missed ``@`` and helpers (a second review)."""
    class ChannelAttention(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(c, c // 4), nn.Linear(c // 4, c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(1)))))[:, None]

    class SelfMadeAttention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(torch.softmax(torch.matmul(x, x.transpose(1, 2)), -1), x)

    class HelperAttention(nn.Module):  # a module-level helper (MPT's remote code)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _attend(x, x, x)

    class OperatorAttention(nn.Module):  # "@" and a sigmoid: no product name at all
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x @ x.transpose(1, 2)) @ x

    class Net(T.PreTrainedModel):
        config_class = T.PretrainedConfig

        def __init__(self, config) -> None:  # noqa: ANN001
            super().__init__(config)
            self.inp, self.ca, self.sa = nn.Linear(8, 16), ChannelAttention(16), SelfMadeAttention()
            self.ha, self.oa, self.head = HelperAttention(), OperatorAttention(), nn.Linear(16, 2)
            self.post_init()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.oa(self.ha(self.sa(self.ca(self.inp(x))))))

    with pytest.warns(lowbit.ConversionWarning):
        _, report = lowbit.convert(Net(T.PretrainedConfig()), FQT, report=True)
    assert sorted(report.skipped) == ["ha", "oa", "sa"]


def test_a_conv1d_shape_error_names_its_own_weight() -> None:
    """An input that does not fit an ``FQTConv1D`` was refused naming ``Wᵀ``'s shape, (6, 5)
    for a Conv1D whose weight is (5, 6) (a review)."""
    from transformers.pytorch_utils import Conv1D

    layer = hf.FQTConv1D.from_float(Conv1D(6, 5), FQT)
    with pytest.raises(RuntimeError, match=r"input of shape \(2, 4\) does not fit a Conv1D weight of "
                       r"shape \(5, 6\) \(nx, nf\): its last dimension must be 5"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_float_attention_gives_finite_gradients_through_a_row_masked_whole(kind: str) -> None:
    """A review: the float attention behind ``output_attentions=True`` (the ``fp`` recipe,
    attention kept float) took the softmax of a row of all ``-inf`` (NaN) and zeroed it
    after; through an additive mask the NaN reached ∇Q, ∇K and the projections. Its
    output and gradients are torch's SDPA's now, the dead row 0 with zero gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    keep[1, :, 0] = False  # sample 1's first query sees nothing
    mask = keep if kind == "bool" else torch.zeros(2, 1, 5, 5).masked_fill(~keep, -math.inf)
    out, weights = hf._float_attention(q, k, v, mask, 0.0, False, None, 1)
    want = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got_g = torch.autograd.grad(out.sum(), (q, k, v))
    want_g = torch.autograd.grad(want.sum(), (q, k, v))
    assert torch.allclose(out, want, atol=1e-5) and torch.equal(weights[1, :, 0], torch.zeros(4, 5))
    for a, b in zip(got_g, want_g):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)  # float32 rounding


@pytest.mark.parametrize("pool", ["", "nn.Module", "torch.nn.Module"],
                         ids=["layers", "with-own-attention", "with-own-attention-transformers-accepts"])
def test_a_model_class_whose_source_transformers_cannot_read_still_switches(pool: str, tmp_path) -> None:
    """A review: transformers' ``set_attn_implementation`` declines, with a log line only,
    where it cannot read a model's source (a class defined in a notebook, here by ``exec``)
    or the file holds another attention class; lowbit then reported the Llama layers'
    attention converted (its children listed) while it ran float (``never_called``). The
    modules call transformers' attention interface, so lowbit switches the config itself —
    except where the model also computes attention with its own code (a second review: the
    switch changed the mask format that module read), where they stay float, said so, and
    are not listed converted — whether transformers declines the switch (a file with such a
    class) or accepts it (the class declared as ``torch.nn.Module``, which its check does not
    read: a third review)."""
    code = (
        "import torch, transformers as T\n"
        "from torch import nn\n"
        "from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding\n"
        f"class PoolAttention({pool or 'nn.Module'}):\n"
        "    def __init__(self, d):\n"
        "        super().__init__(); self.q = nn.Parameter(torch.randn(d))\n"
        "    def forward(self, h):\n"
        "        return (torch.softmax(h @ self.q, -1)[..., None] * h).sum(1)\n"
        "class Net(T.PreTrainedModel):\n"
        "    config_class = T.LlamaConfig\n"
        "    _supports_sdpa = True\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)\n"
        "        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(2))\n"
        "        self.rot = LlamaRotaryEmbedding(config)\n"
        f"        self.pool = PoolAttention(config.hidden_size) if {bool(pool)} else None\n"
        "        self.post_init()\n"
        "    def forward(self, ids):\n"
        "        h = self.emb(ids); pe = self.rot(h, torch.arange(ids.shape[1])[None])\n"
        "        for layer in self.layers:\n"
        "            h = layer(h, attention_mask=None, position_embeddings=pe)\n"
        "        return h if self.pool is None else self.pool(h)\n")
    if pool:  # a file transformers reads (declining for an own-code attention class it finds)
        import importlib.util

        (tmp_path / "pool_model.py").write_text(code)
        spec = importlib.util.spec_from_file_location("pool_model", tmp_path / "pool_model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        space = vars(module)
    else:
        space = {}
        exec(compile(code, "<notebook cell>", "exec"), space)  # noqa: S102 - a class without a source file
    torch.manual_seed(0)
    net = space["Net"](T.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lowbit.ConversionWarning)
        net, report = lowbit.convert(net, FQTConfig.from_recipe("fqt-psq-8", seed=0), report=True)
    children = [n for n in report.converted if n.endswith(hf.CHILD)]
    cov = lowbit.coverage(net, torch.randint(0, 64, (2, 8)), loss_fn=lambda o: o.pow(2).mean())
    assert cov.never_called == ()
    if not pool:
        assert net.config._attn_implementation == hf.IMPLEMENTATION and report.skipped == {}
        assert children == [f"layers.{i}.self_attn.{hf.CHILD}" for i in range(2)] and cov.share("low-bit") == 1.0
        return
    assert net.config._attn_implementation != hf.IMPLEMENTATION and children == []
    assert all(report.skipped[f"layers.{i}.self_attn"].startswith("the model also computes attention with its "
                                                                  "own code (pool)") for i in range(2))
    assert report.skipped["pool"].startswith("PoolAttention computes attention")
