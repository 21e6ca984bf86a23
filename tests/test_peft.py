"""The peft method of lowrank_manifolds.peft: get_peft_model, training, save/load, merge, adapters.

Tiny models built from configs (no download), float32 unless a test is about half precision.
Skipped when ``peft`` or ``transformers`` (``pip install '.[hf]'``) is absent. References are
independent of the code under test: the base model's logits and weights, the library's own
adapters (``add_adapters``) stepped by the same optimizer, peft's LoRA on the same model, a
reload in a fresh process, a hand-written training loop.
"""
import copy
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the peft tests need transformers (pip install '.[hf]')")
peft = pytest.importorskip("peft", reason="the peft tests need peft (pip install '.[hf]')")

import geoopt  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import lowrank_manifolds.peft as lp  # noqa: E402
from lowrank_manifolds.hf import active_ranks  # noqa: E402
from lowrank_manifolds.nn import LowRankAdapterLinear, add_adapters  # noqa: E402
from lowrank_manifolds.optim import DLRT, GeometricAdam  # noqa: E402
from test_hf import VOCAB, _reference, gpt2  # noqa: E402  (the other Hugging Face tests' GPT-2 and loop)

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"], "cnn": ["0", "2", "5"]}


def llama(seed=0, dtype=None):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model if dtype is None else model.to(dtype)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()


BUILD = {"llama": llama, "gpt2": gpt2, "cnn": cnn}


def inputs(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        return torch.randn(6, 3, 9, 9, generator=g)
    return torch.randint(0, VOCAB, (8, 12), generator=g)


def run(model, x):
    with torch.no_grad():
        if x.dtype == torch.long:
            return model(input_ids=x).logits
        return model(x)


def loss(model, x):
    if x.dtype == torch.long:
        return model(input_ids=x, labels=x).loss
    target = torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(5))
    return ((model(x) - target) ** 2).mean()


def config(kind, **kw):
    args = dict(r=2, max_rank=4, tol=0.1, target_modules=TARGETS[kind])
    args.update(kw)
    return lp.LowRankConfig(**args)


def corrections(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lp.LowRankCorrection)}


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def train(model, x, steps=3, opt=None):
    opt = opt or DLRT(trainable(model), lr=0.5, integrator="augmented-bug", model=model)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss(model, x).backward()
        opt.step()
    return model.eval()


def on_manifold(p):
    tol = max(1e-5, 100 * torch.finfo(p.dtype).eps)
    return p.manifold.check_point_on_manifold(p.detach(), explain=True, atol=tol, rtol=tol)


def test_the_package_import_does_not_import_peft():
    code = ("import sys, lowrank_manifolds, lowrank_manifolds.nn, lowrank_manifolds.optim; "
            "assert 'peft' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_registered_in_peft_tables_and_config_round_trip(tmp_path):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    key = "LOWRANK_MANIFOLDS (import lowrank_manifolds.peft)"  # a plain str, as adapter_config.json gives it
    assert PEFT_TYPE_TO_CONFIG_MAPPING[key] is lp.LowRankConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[key] is lp.LowRankModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[key] == "lowrank_"
    lp._register()  # again: idempotent
    assert sum(k == key for k in PEFT_TYPE_TO_CONFIG_MAPPING) == 1
    cfg = lp.LowRankConfig(r=3, max_rank=6, tol=0.2, target_modules=["q_proj"])
    assert cfg.peft_type == key and cfg.peft_type.value == key
    again = peft.get_peft_config(json.loads(json.dumps(cfg.to_dict(), default=list)))
    assert type(again) is lp.LowRankConfig and (again.r, again.max_rank, again.tol) == (3, 6, 0.2)
    cfg.save_pretrained(tmp_path)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is lp.LowRankConfig and loaded.target_modules == {"q_proj"}
    for bad in (dict(r=4, max_rank=2), dict(r=2, tol=0.1), dict(r=0), dict(r=2, max_rank=4, tol=1.0),
                dict(r=2, max_rank=4, retraction="orthographic")):
        with pytest.raises(ValueError):
            lp.LowRankConfig(**bad)


# --------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("kind", ["llama", "gpt2", "cnn"])
def test_at_init_the_logits_are_the_base_models_and_the_base_is_untouched(kind):
    base = BUILD[kind]()
    x = inputs(kind)
    ref = run(base, x)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config(kind))
    assert torch.equal(run(model, x), ref)  # bitwise
    base_sd = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items()
               if "lowrank_" not in k}
    assert base_sd.keys() == weights.keys() and all(torch.equal(base_sd[k], v) for k, v in weights.items())
    # the same layers as peft's LoRA with the same target_modules
    lora = get_peft_model(BUILD[kind](), LoraConfig(r=2, target_modules=TARGETS[kind]))
    assert sorted(model.base_model.targeted_module_names) == sorted(lora.base_model.targeted_module_names)
    corr = corrections(model)
    assert len(corr) == len(lora.base_model.targeted_module_names) >= 3
    for name, c in corr.items():
        mf = c.manifold
        assert isinstance(c.delta, geoopt.ManifoldParameter) and c.delta.manifold is mf
        assert tuple(c.delta.shape) == (mf.m + mf.capacity + mf.n, mf.capacity) and mf.capacity == 4
        assert c.active_rank == 2 and torch.equal(c.delta.detach(), c.delta_init) and on_manifold(c.delta)[0]
    assert {id(p) for p in trainable(model)} == {id(c.delta) for c in corr.values()}


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_default_and_all_linear_targets_are_loras(targets):
    for kind in ("llama", "gpt2"):
        model = get_peft_model(BUILD[kind](), lp.LowRankConfig(r=2, target_modules=targets))
        lora = get_peft_model(BUILD[kind](), LoraConfig(r=2, target_modules=targets))
        assert sorted(model.base_model.targeted_module_names) == sorted(lora.base_model.targeted_module_names)
        assert len(corrections(model)) == len(lora.base_model.targeted_module_names) >= 2


def test_layers_smaller_than_the_capacity_are_clipped():
    model = get_peft_model(llama(), lp.LowRankConfig(r=20, max_rank=40, target_modules=["k_proj", "q_proj"]))
    caps = {n.split(".")[-3]: c.capacity for n, c in corrections(model).items()}
    assert caps == {"k_proj": 16, "q_proj": 32}  # k_proj is 16 x 32, q_proj 32 x 32


# --------------------------------------------------------------------------- training
def _reference_adapters(peft_model, kind="llama"):
    """The library's own adapters (add_adapters) on a fresh base with the same correction:
    W0 - Delta0 folded into the base, Delta copied: the same function to rounding."""
    ref = BUILD[kind]()
    add_adapters(ref, rank=2, max_rank=4, tol=0.1, include=[f"*{t}" for t in TARGETS[kind]], exact_init=False)
    ours = corrections(peft_model)
    pairs = []
    for name, layer in ref.named_modules():
        if isinstance(layer, LowRankAdapterLinear):
            c = ours[f"base_model.model.{name}.lowrank_delta.default"]
            with torch.no_grad():
                layer.delta.copy_(c.delta)
                layer.base.weight.sub_(c.manifold.to_dense(c.delta_init))
            pairs.append((c.delta, layer.delta))
    return ref, pairs


@pytest.mark.parametrize("optimizer", ["dlrt", "geometric-adam", "riemannian-adam"])
def test_training_steps_as_the_librarys_own_adapters_and_changes_the_ranks(optimizer):
    x = inputs("llama")
    model = get_peft_model(llama(), config("llama"))
    ref, pairs = _reference_adapters(model)
    assert (run(ref, x) - run(model, x)).abs().max() < 1e-6

    def make(m):
        if optimizer == "dlrt":
            return DLRT(trainable(m), lr=0.5, integrator="augmented-bug", model=m)
        if optimizer == "geometric-adam":
            return GeometricAdam(trainable(m), lr=0.02, tol=0.1)
        return geoopt.optim.RiemannianAdam(trainable(m), lr=0.02)

    before = float(loss(model, x).detach())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, x, steps=4, opt=make(model))
    assert not [w for w in caught if "no recorded" in str(w.message)]  # DLRT found the corrections' pairs
    train(ref, x, steps=4, opt=make(ref))
    assert float(loss(model, x).detach()) < before
    ranks = []
    for ours, theirs in pairs:
        assert isinstance(ours, geoopt.ManifoldParameter) and on_manifold(ours)[0]
        assert tuple(ours.shape) == tuple(theirs.shape)  # the static capacity shape
        r = int(ours.manifold.active_rank(ours.detach()))
        assert r == int(theirs.manifold.active_rank(theirs.detach())) and 1 <= r <= 4
        ranks.append(r)
        err = (ours.detach() - theirs.detach()).abs().max()
        assert err <= 1e-4 * theirs.detach().abs().max()
    assert ranks != [2] * len(ranks)  # the ranks moved within the capacity
    assert (run(ref, x) - run(model, x)).abs().max() < 1e-4


def test_dropout_acts_before_the_input_dlrt_records():
    x = inputs("llama")
    model = get_peft_model(llama(), config("llama", dropout=0.5))
    torch.manual_seed(3)
    train(model, x, steps=2)  # DLRT refuses a step whose p.grad is not the recorded pair's gradient
    assert torch.equal(run(model, x), run(model, x))  # eval: no dropout
    assert all(on_manifold(c.delta)[0] for c in corrections(model).values())


# --------------------------------------------------------------------------- save and load
CHILD = textwrap.dedent("""
    import sys, torch, geoopt, transformers
    from peft import PeftModel
    base_dir, adapter_dir, x_path, out_path = sys.argv[1:5]
    x = torch.load(x_path)
    try:
        PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
        message = None
    except KeyError as exc:
        message = str(exc)
    import lowrank_manifolds.peft
    from lowrank_manifolds.hf import active_ranks
    result = {"message": message}
    for low in (False, True):
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, adapter_dir, low_cpu_mem_usage=low, is_trainable=True).eval()
        deltas = [p for n, p in model.named_parameters() if n.endswith("lowrank_delta.default.delta")]
        assert deltas and all(isinstance(p, geoopt.ManifoldParameter) and p.requires_grad for p in deltas)
        assert all(p.device.type == "cpu" for p in model.parameters())
        with torch.no_grad():
            result[low] = (model(input_ids=x).logits, active_ranks(model))
    torch.save(result, out_path)
""")


def test_save_pretrained_and_from_pretrained_in_a_fresh_process(tmp_path):
    x = inputs("llama")
    base = llama()
    base.save_pretrained(tmp_path / "base")
    model = train(get_peft_model(base, config("llama")), x)
    ranks = active_ranks(model)
    assert set(ranks.values()) != {2}
    out = run(model, x)
    model.save_pretrained(tmp_path / "adapter")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        shapes = {k: tuple(f.get_tensor(k).shape) for k in keys}
    assert len(keys) == 8 and all(k.endswith(("lowrank_delta.delta", "lowrank_delta.delta_init")) for k in keys)
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lowrank_delta.delta"] == (16 + 4 + 32, 4)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "base"), str(tmp_path / "adapter"),
                           str(tmp_path / "x.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert "import lowrank_manifolds.peft" in got["message"]
    for low in (False, True):
        logits, loaded_ranks = got[low]
        assert torch.equal(logits, out)  # bit-identical
        assert loaded_ranks == ranks


def test_loading_checks_the_capacity_and_the_point(tmp_path):
    x = inputs("llama")
    model = train(get_peft_model(llama(), config("llama")), x, steps=2)
    model.save_pretrained(tmp_path / "ok")
    again = PeftModel.from_pretrained(llama(), tmp_path / "ok")
    assert torch.equal(run(again, x), run(model, x))
    # another capacity in the config: the saved packed shape does not fit
    model.save_pretrained(tmp_path / "capacity")
    path = tmp_path / "capacity" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["max_rank"] = 3
    path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="capacity R = 3"):
        PeftModel.from_pretrained(llama(), tmp_path / "capacity")
    # a saved point that is not on the manifold (a basis column scaled)
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path / "point")
    file = tmp_path / "point" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lowrank_delta.delta"
    tensors[key][:32, 0] *= 2
    save_file(tensors, str(file))
    with pytest.raises(RuntimeError, match="not a point of its manifold"):
        PeftModel.from_pretrained(llama(), tmp_path / "point")


def test_low_cpu_mem_usage_restores_the_manifold_parameters():
    x = inputs("llama")
    trained = train(get_peft_model(llama(), config("llama")), x, steps=2)
    state = peft.get_peft_model_state_dict(trained)
    empty = get_peft_model(llama(), config("llama"), low_cpu_mem_usage=True)
    assert all(c.delta.device.type == "meta" for c in corrections(empty).values())
    peft.set_peft_model_state_dict(empty, state, low_cpu_mem_usage=True)
    for c in corrections(empty).values():
        assert isinstance(c.delta, geoopt.ManifoldParameter) and c.delta.manifold is c.manifold
        assert c.delta.device.type == "cpu"
    assert torch.equal(run(empty.eval(), x), run(trained, x))


# --------------------------------------------------------------------------- merge, disable, unload
@pytest.mark.parametrize("kind", ["llama", "gpt2", "cnn"])
def test_merge_unmerge_disable_and_unload(kind):
    x = inputs(kind)
    base = BUILD[kind]()
    ref = run(base, x)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = train(get_peft_model(base, config(kind)), x)
    out = run(model, x)
    assert (out - ref).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(run(model, x), ref)
    assert torch.equal(run(model, x), out)

    unmerged = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, lp.LowRankLayer)]
    model.merge_adapter()
    assert all(m.merged for m in layers)
    assert (run(model, x) - out).abs().max() < 1e-5
    model.unmerge_adapter()
    for name, m in model.get_base_model().named_modules():
        if isinstance(m, lp.LowRankLayer):
            w0 = weights[name + ".weight"]
            assert (m.base_layer.weight - w0).abs().max() <= 1e-6 * w0.abs().max()  # to rounding
    assert (run(model, x) - out).abs().max() < 1e-5

    merged = copy.deepcopy(model).merge_and_unload()
    lora = get_peft_model(BUILD[kind](), LoraConfig(r=2, target_modules=TARGETS[kind])).merge_and_unload()
    assert [type(m) for m in merged.modules()] == [type(m) for m in lora.modules()]  # peft's merged layout
    assert not any(isinstance(p, geoopt.ManifoldParameter) for p in merged.parameters())
    assert (run(merged, x) - out).abs().max() < 1e-5

    plain = unmerged.unload()  # never merged
    assert plain.state_dict().keys() == weights.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in weights.items())  # the base, exactly
    assert torch.equal(run(plain, x), ref)


# --------------------------------------------------------------------------- several adapters
def test_several_adapters_add_set_save_and_load(tmp_path):
    x = inputs("llama")
    ref = run(llama(), x)
    model = train(get_peft_model(llama(), config("llama")), x, steps=2)
    out_a = run(model, x)
    model.add_adapter("b", lp.LowRankConfig(r=1, max_rank=2, tol=0.1, target_modules=["q_proj", "k_proj"]))
    assert torch.equal(run(model, x), out_a)  # b is added, not active
    assert not any(c.delta.requires_grad for n, c in corrections(model).items() if n.endswith(".b"))
    model.set_adapter("b")
    assert torch.equal(run(model, x), ref)  # b at its initial point: the base model exactly
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("lowrank_delta.b.delta") for n in names)
    assert sum("k_proj" in n for n in names) == 2
    train(model, x, steps=2, opt=GeometricAdam(trainable(model), lr=0.02, tol=0.1))
    out_b = run(model, x)
    assert (out_b - ref).abs().max() > 1e-4
    model.set_adapter("default")
    assert torch.equal(run(model, x), out_a)

    model.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(llama(), tmp_path)
    fresh.load_adapter(tmp_path / "b", "b")
    assert torch.equal(run(fresh, x), out_a)
    fresh.set_adapter("b")
    assert torch.equal(run(fresh, x), out_b)
    fresh.delete_adapter("b")
    assert not any(n.endswith(".b") for n in corrections(fresh))
    assert torch.equal(run(fresh, x), out_a)


def test_mixed_adapter_batches_are_refused():
    model = get_peft_model(llama(), config("llama"))
    with pytest.raises(ValueError, match="adapter_names"):
        model(input_ids=inputs("llama"), adapter_names=["default"] * 8)


# --------------------------------------------------------------------------- Trainer
def test_trainer_with_dlrt_matches_a_hand_loop_and_saves_a_loadable_adapter(tmp_path):
    pytest.importorskip("accelerate")
    from lowrank_manifolds.hf import ActiveRankCallback

    lr, clip, steps = 0.5, 0.005, 3
    data = [{"input_ids": row, "labels": row} for row in inputs("llama", seed=3)]
    model = get_peft_model(llama(), config("llama"))
    start = copy.deepcopy(model)
    callback = ActiveRankCallback()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=steps, max_grad_norm=clip, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    opt = DLRT(trainable(model), lr=lr, integrator="augmented-bug", model=model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                                   callbacks=[callback])
    trainer.train()

    ref = start  # the same steps by hand: full batch, clip_grad_norm_, lr (1 - t / steps)
    x = torch.stack([d["input_ids"] for d in data])
    ref, norms = _reference(ref, steps, clip, data, lr, DLRT(trainable(ref), lr=lr, integrator="augmented-bug",
                                                            model=ref))
    assert min(norms) > 2 * clip  # the clipping bites

    def deltas(m):
        return torch.cat([c.delta.detach().reshape(-1) for c in corrections(m).values()])

    assert (deltas(model) - deltas(ref)).abs().max() < 1e-5 * deltas(ref).abs().max()
    logged = [h for h in trainer.state.log_history if "lowrank/rank_mean" in h]
    assert len(logged) >= steps
    assert callback.history[-1][1] == active_ranks(model)
    trainer.save_model(str(tmp_path / "final"))
    again = PeftModel.from_pretrained(llama(), tmp_path / "final")
    model.eval()
    assert torch.equal(run(again, x), run(model, x))


def test_trainer_resume_from_checkpoint_continues_the_run(tmp_path):
    pytest.importorskip("accelerate")
    data = [{"input_ids": row, "labels": row} for row in inputs("llama", seed=3)]

    def args(out, **kw):
        base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                    save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                    dataloader_num_workers=0)
        base.update(kw)
        return transformers.TrainingArguments(**base)

    def fit(model, out, resume=None, **kw):
        opt = DLRT(trainable(model), lr=0.5, integrator="augmented-bug", model=model)
        transformers.Trainer(model=model, args=args(out, **kw), train_dataset=data,
                             optimizers=(opt, None)).train(resume_from_checkpoint=resume)
        return torch.cat([c.delta.detach().reshape(-1) for c in corrections(model).values()])

    start = get_peft_model(llama(), config("llama", task_type="CAUSAL_LM"))
    assert type(start).__name__ == "PeftModelForCausalLM"
    straight = fit(copy.deepcopy(start), tmp_path / "a")
    fit(copy.deepcopy(start), tmp_path / "b", save_strategy="steps", save_steps=2)
    assert (tmp_path / "b" / "checkpoint-2" / "adapter_config.json").exists()
    resumed = fit(copy.deepcopy(start), tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    initial = torch.cat([c.delta.detach().reshape(-1) for c in corrections(start).values()])
    err = (resumed - straight).abs().max()
    assert err <= 1e-6 * straight.abs().max() and (initial - straight).abs().max() > 1e3 * max(float(err), 1e-12)


# --------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_base_keeps_float32_manifold_corrections(dtype, tmp_path):
    x = inputs("llama")
    base = llama(dtype=dtype)
    ref = run(base, x)
    model = get_peft_model(base, config("llama"))  # autocast_adapter_dtype=True, peft's default
    out = run(model, x)
    assert out.dtype == dtype and torch.equal(out, ref)
    for c in corrections(model).values():
        assert isinstance(c.delta, geoopt.ManifoldParameter) and c.delta.dtype == torch.float32
        assert c.delta_init.dtype == torch.float32
    train(model, x, steps=2, opt=geoopt.optim.RiemannianAdam(trainable(model), lr=0.02))
    assert all(on_manifold(c.delta)[0] for c in corrections(model).values())
    out = run(model, x)
    assert not torch.equal(out, ref)
    model.save_pretrained(tmp_path)
    for low in (False, True):  # peft casts a loaded adapter to the base's dtype with low_cpu_mem_usage
        again = PeftModel.from_pretrained(llama(dtype=dtype), tmp_path, low_cpu_mem_usage=low)
        assert all(isinstance(c.delta, geoopt.ManifoldParameter) and c.delta.dtype == torch.float32
                   for c in corrections(again).values())
        assert torch.equal(run(again, x), out)
    merged = copy.deepcopy(model).merge_and_unload()
    assert all(p.dtype == dtype for p in merged.parameters())
    assert (run(merged, x).float() - out.float()).abs().max() < 0.02 * out.float().abs().max()  # W0 + D rounded
    # peft's re-wrap: a half precision adapter is re-assigned as plain float32 nn.Parameters
    model.to(dtype)
    assert all(c.delta.dtype == dtype for c in corrections(model).values())
    model.base_model._cast_adapter_dtype("default", autocast_adapter_dtype=True)
    for c in corrections(model).values():
        assert isinstance(c.delta, geoopt.ManifoldParameter) and c.delta.dtype == torch.float32
        assert c.delta.manifold is c.manifold


def test_save_lowrank_on_a_peft_model_names_the_peft_path(tmp_path):
    from lowrank_manifolds.nn import save_lowrank

    model = get_peft_model(llama(), config("llama"))
    with pytest.raises(TypeError, match="save_pretrained"):
        save_lowrank(model, tmp_path)
    assert not any(tmp_path.iterdir())
