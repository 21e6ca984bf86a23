"""Hugging Face models: conversion, adapters, save/load, merge, Trainer and accelerate.

Tiny models built from configs (no download), float32, seconds in all. Skipped when
``transformers`` (``pip install '.[hf]'``) is absent; the safetensors, Trainer and accelerate
tests also need ``safetensors`` and ``accelerate``. References are independent of the code under
test: the dense model's logits, a hand-written training loop, an uninterrupted run.
"""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install '.[hf]')")

from lowrank_manifolds.nn import (  # noqa: E402
    LowRankAdapterLinear,
    LowRankLinear,
    add_adapters,
    convert_to_low_rank,
    export_dense,
    load_lowrank,
    register_linear,
    save_lowrank,
)
from lowrank_manifolds.optim import DLRT, GeometricAdam  # noqa: E402

VOCAB = 48


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens(n=8, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- conversion and report
@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_full_rank_conversion_keeps_the_logits(build):
    model = build()
    x = tokens()
    ref = logits(model, x)
    rep = convert_to_low_rank(model, max_rank=10**6, require_saving=False, report=True)
    assert rep.module is model
    out = logits(model, x)
    assert (out - ref).abs().max() < 1e-5
    lowrank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert sorted(lowrank) == sorted(rep.names) and len(lowrank) == (8 if build is gpt2 else 15)
    for c in rep.changed:
        assert c.rank == c.capacity == min(c.shape)
    if build is gpt2:  # GPT-2: Conv1D layers, lm_head tied to the token embedding
        assert {c.layer_type.rsplit(".", 1)[-1] for c in rep.changed} == {"Conv1D"}
        reasons = rep.skip_reasons()
        assert list(reasons) == ["lm_head"]
        assert "tied" in reasons["lm_head"] and "transformer.wte.weight" in reasons["lm_head"]
        assert model.lm_head.weight is model.transformer.wte.weight


def test_report_counts_and_targeting():
    model = gpt2()
    before = n_params(model)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("mlp.c_fc")}
    rep = convert_to_low_rank(model, rank=4, include=["*mlp.c_fc"], report=True)
    assert rep.params_before == before and rep.params_after == n_params(model)
    assert sorted(rep.names) == sorted(shapes)
    for c in rep.changed:
        nx, nf = shapes[c.name]  # Conv1D stores in x out
        assert c.shape == (nf, nx) and c.rank == 4
        assert c.params_before == nx * nf + nf and c.params_after == (nf + 4 + nx) * 4 + nf
    assert rep.params_before - rep.params_after == sum(c.params_before - c.params_after for c in rep.changed)
    reasons = rep.skip_reasons()
    assert reasons["transformer.h.0.attn.c_attn"] == "not matched by include"
    assert "lm_head" in reasons
    # without a report the module is returned, as before
    assert convert_to_low_rank(gpt2(), rank=4, include=["*c_fc"]).__class__.__name__ == "GPT2LMHeadModel"


def test_rank_above_the_matrix_and_no_saving_are_reported():
    rep = convert_to_low_rank(llama(), rank=40, include=["*q_proj"], report=True)
    reasons = rep.skip_reasons()
    assert not rep.changed
    assert reasons["model.layers.0.self_attn.q_proj"].startswith("rank 40 > min(m, n) = 32")
    rep = convert_to_low_rank(llama(), rank=16, include=["*k_proj"], report=True)  # 16 x 32: 16 * 64 >= 512
    assert not rep.changed and rep.skip_reasons()["model.layers.1.self_attn.k_proj"].startswith("no saving")


def test_package_import_does_not_import_transformers():
    code = ("import sys, lowrank_manifolds, lowrank_manifolds.nn, lowrank_manifolds.optim; "
            "assert 'transformers' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


class TransposedDense(nn.Module):
    """A user's layer: y = x @ w + b with w stored in x out (as Conv1D)."""

    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(w.detach().clone())
        self.b = nn.Parameter(b.detach().clone())

    def forward(self, x):
        return x @ self.w + self.b


def _to_linear(mod):
    lin = nn.Linear(*mod.w.shape)
    with torch.no_grad():
        lin.weight.copy_(mod.w.t())
        lin.bias.copy_(mod.b)
    return lin


def test_registered_user_type_is_converted_and_exported_back():
    torch.manual_seed(0)
    model = nn.Sequential(TransposedDense(torch.randn(12, 20), torch.randn(20)), nn.Tanh())
    x = torch.randn(5, 12)
    ref = model(x).detach()
    rep = convert_to_low_rank(copy.deepcopy(model), rank=4, report=True)
    assert not rep.changed  # not registered: left alone (a plain module of unknown type)
    register_linear(TransposedDense, _to_linear, lambda lin: TransposedDense(lin.weight.t(), lin.bias), replace=True)
    with pytest.raises(ValueError, match="registered already"):
        register_linear(TransposedDense, _to_linear, lambda lin: lin)
    rep = convert_to_low_rank(model, max_rank=12, require_saving=False, report=True)
    assert rep.names == ["0"] and isinstance(model[0], LowRankLinear)
    assert (model(x) - ref).abs().max() < 1e-5
    export_dense(model)
    assert type(model[0]) is TransposedDense and (model(x) - ref).abs().max() < 1e-5


# --------------------------------------------------------------------------- save, load, merge
def _train_a_little(model, steps=3, opt=None):
    x = tokens(4, 10, seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or GeometricAdam(params, lr=3e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.mark.parametrize("build,targets", [(llama, ["*q_proj", "*v_proj"]), (gpt2, ["*c_attn", "*c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_adapters_alone_save_and_load_bit_identically(build, targets, tmp_path):
    pytest.importorskip("safetensors")
    model = build()
    x = tokens()
    ref = logits(model, x)
    rep = add_adapters(model, rank=2, max_rank=4, tol=0.05, include=targets, report=True)
    assert len(rep.changed) == 4 and all(c.action == "adapter" for c in rep.changed)
    assert (logits(model, x) - ref).abs().max() < 1e-5  # exact_init: the base model's function
    _train_a_little(model)
    out = logits(model, x)
    assert (out - ref).abs().max() > 1e-4  # training moved it
    save_lowrank(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lowrank.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.endswith(("delta", "delta_init")) for k in keys) and len(keys) == 8
    fresh = load_lowrank(build(), tmp_path)
    assert torch.equal(logits(fresh, x), out)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    other = build(seed=1)  # another base: refused before anything changes, by its fingerprint
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="base layer is not the one"):
        load_lowrank(other, tmp_path)
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    other = load_lowrank(other, tmp_path, check_base=False)  # on request: not the same function
    assert not torch.equal(logits(other, x), out)


@pytest.mark.parametrize("how", ["direct", "no-exact-init"])
def test_adapters_without_a_recorded_initial_correction_load_bit_identically(how, tmp_path):
    pytest.importorskip("safetensors")
    model = llama()
    if how == "direct":  # built by hand: Delta0 unknown, so the folded base weight is saved
        attn = model.model.layers[0].self_attn
        attn.q_proj = LowRankAdapterLinear(attn.q_proj, 2, max_rank=4, tol=0.05)
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("delta"))
    else:  # the base is left untouched: nothing to save but the corrections
        add_adapters(model, rank=2, include=["*v_proj"], exact_init=False)
    _train_a_little(model)
    x = tokens()
    out = logits(model, x)
    save_lowrank(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lowrank.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    if how == "direct":
        assert keys == ["model.layers.0.self_attn.q_proj.base.weight", "model.layers.0.self_attn.q_proj.delta"]
    else:
        assert all(k.endswith(".delta") for k in keys) and len(keys) == 2
    assert torch.equal(logits(load_lowrank(llama(), tmp_path), x), out)
    if how != "direct":  # the untouched base is fingerprinted too
        with pytest.raises(ValueError, match="base layer is not the one"):
            load_lowrank(llama(seed=1), tmp_path)


def test_lowrank_state_save_and_load_bit_identically(tmp_path):
    pytest.importorskip("safetensors")
    model = llama()
    convert_to_low_rank(model, rank=6, max_rank=8, tol=0.05, exclude=["lm_head"])
    params = [p for p in model.parameters() if p.requires_grad]
    _train_a_little(model, opt=DLRT(params, lr=0.05, integrator="augmented-bug", tol=0.5, model=model,
                                    euclidean="adam"))
    ranks = {n: m.active_rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(set(ranks.values())) > 1 or min(ranks.values()) != 6  # the ranks moved
    x = tokens()
    out = logits(model, x)
    save_lowrank(model, tmp_path / "state.safetensors")
    fresh = load_lowrank(llama(), tmp_path / "state.safetensors")
    assert torch.equal(logits(fresh, x), out)
    for n, m in fresh.named_modules():
        if isinstance(m, LowRankLinear):
            assert m.active_rank == ranks[n] and m.capacity == 8 and m.manifold.truncation.tol == 0.05
    without = load_lowrank(llama(), _saved(model, tmp_path, extra="none"))  # factors only: embeddings fresh
    assert not torch.equal(logits(without, x), out)


def test_convolution_state_save_and_load(tmp_path):
    pytest.importorskip("safetensors")

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.Flatten())

    model = convert_to_low_rank(build(), rank=4, max_rank=6, tol=0.05)
    with torch.no_grad():  # another point than the fresh model's: its S scaled column by column
        s = model[2].manifold.unpack(model[2].weight)[1]
        s.mul_(torch.linspace(0.5, 1.5, s.shape[-1]))
    x = torch.randn(2, 3, 9, 9)
    save_lowrank(model, tmp_path)
    fresh = load_lowrank(build(), tmp_path)
    assert type(fresh[0]).__name__ == "LowRankConv2d" and torch.equal(fresh(x), model(x))


def _saved(model, tmp_path, extra):
    path = tmp_path / f"state-{extra}.safetensors"
    save_lowrank(model, path, extra=extra)
    return path


def test_merge_gives_a_plain_model_for_save_pretrained(tmp_path):
    pytest.importorskip("safetensors")
    model = gpt2()
    add_adapters(model, rank=2, include=["*c_attn", "*mlp.c_proj"])
    _train_a_little(model)
    x = tokens()
    out = logits(model, x)
    merged = export_dense(model)
    conv1d = transformers.pytorch_utils.Conv1D
    assert all(type(m) is conv1d for n, m in merged.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")))
    assert not any(isinstance(m, LowRankAdapterLinear) for m in merged.modules())
    assert (logits(merged, x) - out).abs().max() < 1e-5
    merged.save_pretrained(tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(again, x), logits(merged, x))
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()


# --------------------------------------------------------------------------- Trainer and accelerate
LR, CLIP, STEPS = 0.5, 0.005, 3


def _data():
    x = tokens(8, 12, seed=3)
    return [{"input_ids": row, "labels": row} for row in x]


def _adapted(seed=0):
    model = llama(seed)
    add_adapters(model, rank=2, max_rank=4, tol=0.1, include=["*q_proj", "*v_proj"])
    return model


def _dlrt(model):
    return DLRT([p for p in model.parameters() if p.requires_grad], lr=LR, integrator="augmented-bug", model=model)


def _reference(model, steps=STEPS, clip=CLIP, data=None, lr=LR, opt=None):
    """Full-batch steps with clip_grad_norm_ and the linear schedule lr (1 - t / steps), by hand
    (the Trainer's run as a loop); ``data``, ``opt`` default to this module's."""
    x = torch.stack([d["input_ids"] for d in (data or _data())])
    opt = opt or _dlrt(model)
    model.train()
    norms = []
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (1 - t / steps)
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))))
        opt.step()
    return model, norms


def _deltas(model):
    return torch.cat([m.delta.detach().reshape(-1) for m in model.modules() if isinstance(m, LowRankAdapterLinear)])


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=STEPS, max_grad_norm=CLIP, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trainer_with_dlrt_honours_clipping_accumulation_and_schedule(tmp_path):
    pytest.importorskip("accelerate")
    from lowrank_manifolds.hf import ActiveRankCallback

    model = _adapted()
    start = copy.deepcopy(model)
    callback = ActiveRankCallback()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                                   optimizers=(_dlrt(model), None), callbacks=[callback])
    trainer.train()
    ref, norms = _reference(copy.deepcopy(start))
    unclipped, _ = _reference(copy.deepcopy(start), clip=None)
    assert min(norms) > 2 * CLIP  # the clipping bites at every step
    err = (_deltas(model) - _deltas(ref)).abs().max()
    assert err < 1e-5 * _deltas(ref).abs().max()
    assert (_deltas(unclipped) - _deltas(ref)).abs().max() > 100 * err
    logged = [h for h in trainer.state.log_history if "lowrank/rank_mean" in h]
    assert len(logged) >= STEPS and [s for s, _ in callback.history][:STEPS] == [1, 2, 3]
    assert callback.history[-1][1] == {n: m.active_rank for n, m in model.named_modules()
                                       if isinstance(m, LowRankAdapterLinear)}


def test_trainer_resume_from_checkpoint_continues_the_run(tmp_path):
    pytest.importorskip("accelerate")
    steps = 4
    model = _adapted()
    start = copy.deepcopy(model)
    straight = transformers.Trainer(model=model, args=_args(tmp_path / "a", max_steps=steps),
                                    train_dataset=_data(), optimizers=(_dlrt(model), None))
    straight.train()
    first = copy.deepcopy(start)
    t1 = transformers.Trainer(model=first, args=_args(tmp_path / "b", max_steps=steps, save_strategy="steps",
                                                      save_steps=2), train_dataset=_data(),
                              optimizers=(_dlrt(first), None))
    t1.train()
    resumed = copy.deepcopy(start)
    t2 = transformers.Trainer(model=resumed, args=_args(tmp_path / "b", max_steps=steps), train_dataset=_data(),
                              optimizers=(_dlrt(resumed), None))
    t2.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert t2.state.global_step == steps
    err = (_deltas(resumed) - _deltas(model)).abs().max()
    assert err <= 1e-6 * _deltas(model).abs().max()
    assert (_deltas(start) - _deltas(model)).abs().max() > 1e3 * max(float(err), 1e-12)


def test_accelerate_loop_with_accumulation_and_clipping():
    accelerate = pytest.importorskip("accelerate")
    model = _adapted()
    start = copy.deepcopy(model)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = _dlrt(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / STEPS)
    loader = torch.utils.data.DataLoader(_data(), batch_size=4, shuffle=False)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    model.train()
    for _ in range(STEPS):
        for batch in loader:
            with acc.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                sched.step()
                opt.zero_grad()
    ref, _ = _reference(copy.deepcopy(start))
    got = _deltas(acc.unwrap_model(model))
    assert (got - _deltas(ref)).abs().max() < 1e-5 * _deltas(ref).abs().max()
