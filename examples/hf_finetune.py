"""Fine-tune a Hugging Face model with rank-adaptive adapters, side by side with peft's LoRA.

    python examples/hf_finetune.py [--quick | --smoke] [--seed S] [--threads T] [--no-plot]

Offline, a few minutes on one CPU thread (``--quick``: under a minute; ``--smoke``: seconds):

1. a byte-level ``LlamaForCausalLM`` is built from a config (hidden 64, 2 layers; no download)
   and pre-trained briefly on the top-level modules of Python's standard library;
2. it is fine-tuned on another part, the ``asyncio`` package, with the ``transformers``
   ``Trainer`` twice: peft ``LoRA`` (``r=8``) with the Trainer's own AdamW, and this library's
   ``add_adapters(rank=8, max_rank=16, tol=0.1)`` with ``DLRT`` (augmented BUG) passed as
   ``optimizers=(opt, None)``; the Trainer's gradient clipping, lr schedule and logging apply
   to both, and ``ActiveRankCallback`` adds the active ranks to the logs;
3. the adapters alone are saved to ``safetensors`` and loaded into a freshly built base model
   (bit-identical logits), then merged into a plain model that ``save_pretrained`` /
   ``from_pretrained`` round-trip.

The side-by-side study with AdaLoRA, the geometric optimizers, compression, lr grids and seeds
is ``benchmarks/bench_hf.py`` (docs/huggingface.md).
"""
from __future__ import annotations

import copy
import glob
import os
import pathlib
import re
import sys
import time

import torch

import _common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sizes(args):
    if args.smoke:
        return dict(pretrain=2, steps=2, T=32, batch=4, windows=16, kbytes=40)
    if args.quick:
        return dict(pretrain=200, steps=60, T=64, batch=16, windows=512, kbytes=400)
    return dict(pretrain=1000, steps=300, T=64, batch=16, windows=4096, kbytes=2000)


def read(files, kbytes):
    data = b"\n".join(pathlib.Path(f).read_bytes() for f in files)[: kbytes * 1024]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(data, n, t, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, data.numel() - t - 1, (n,), generator=g)
    return [{"input_ids": data[i:i + t], "labels": data[i:i + t]} for i in idx.tolist()]


def build(t):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)  # the same base model in every build
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=t,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def val_loss(model, val):
    model.eval()
    with torch.no_grad():
        x = torch.stack([d["input_ids"] for d in val])
        out = float(model(input_ids=x, labels=x).loss)
    model.train()
    return out


def trainer_args(sz, out, lr, smoke):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, per_device_train_batch_size=sz["batch"], max_steps=sz["steps"],
                             learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                             logging_steps=max(1, sz["steps"] // 5), save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=smoke or not sys.stderr.isatty(),
                             dataloader_num_workers=0)


def plot_ranks(history):
    """The active rank of every adapter at each log of the Trainer."""
    fig, (ax,) = _common.new_figure(1, width=8)
    if fig is None:
        return
    steps = [s for s, _ in history]
    names = list(history[0][1])
    # "model.layers.0.self_attn.q_proj" -> "layer 0 q_proj"
    labels = {n: re.sub(r"^.*layers\.(\d+)\..*\.(\w+)$", r"layer \1 \2", n) for n in names}
    look = _common.styles(list(labels.values()))
    for name in names:
        _common.curve(ax, steps, [h[name] for _, h in history], look[labels[name]])
    ax.set(xlabel="step", ylabel="active rank",
           title=f"the {len(names)} adapters under DLRT aug-BUG (tol 0.1, capacity 16)")
    _common.integer_ticks(ax)
    _common.legend(ax, ncol=2)
    _common.save_figure(fig, "hf_finetune_ranks")


def main():
    args = _common.parse_args(__doc__.split("\n")[0])
    import transformers
    import peft
    from lowrank_manifolds.hf import ActiveRankCallback
    from lowrank_manifolds.nn import add_adapters, export_dense, load_lowrank, save_lowrank
    from lowrank_manifolds.optim import DLRT

    transformers.logging.set_verbosity_error()
    sz = sizes(args)
    lib = os.path.dirname(os.__file__)
    pre = read(sorted(glob.glob(os.path.join(lib, "*.py"))), sz["kbytes"])
    fine_files = sorted(glob.glob(os.path.join(lib, "asyncio", "*.py")))
    fine = read([f for i, f in enumerate(fine_files) if i % 6], sz["kbytes"])
    val = windows(read(fine_files[::6], sz["kbytes"]), 32, sz["T"], seed=99)
    work = str(_common.scratch_folder("hf_finetune_"))  # the saved adapters of one run

    # 1. pre-train the base on the standard library's top-level modules (plain AdamW)
    base = build(sz["T"])
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in _common.progress(range(sz["pretrain"]), desc="pre-training"):
        x = torch.stack([pre[i:i + sz["T"]] for i in torch.randint(0, pre.numel() - sz["T"], (sz["batch"],),
                                                                    generator=g).tolist()])
        opt.zero_grad()
        base(input_ids=x, labels=x).loss.backward()
        opt.step()
    base_state = copy.deepcopy(base.state_dict())
    rows = [["pre-trained base", "-", sum(p.numel() for p in base.parameters()), "-", val_loss(base, val), "-"]]
    train = windows(fine, sz["windows"], sz["T"], seed=args.seed)

    def fresh_base():
        model = build(sz["T"])
        model.load_state_dict(base_state)
        return model

    # 2a. peft LoRA with the Trainer's own AdamW
    torch.manual_seed(args.seed)
    lora = peft.get_peft_model(fresh_base(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                             lora_dropout=0.0))
    start = time.perf_counter()
    transformers.Trainer(model=lora, args=trainer_args(sz, os.path.join(work, "lora"), 3e-3, args.smoke),
                         train_dataset=train).train()
    rows.append(["peft LoRA r=8 + AdamW (Trainer)", "3e-3", sum(p.numel() for p in lora.parameters() if p.requires_grad),
                 "8 (fixed)", val_loss(lora, val), (time.perf_counter() - start) / sz["steps"]])

    # 2b. this library's adapters, rank-adaptive, with DLRT passed to the same Trainer
    torch.manual_seed(args.seed)
    model = fresh_base()
    report = add_adapters(model, rank=8, max_rank=16, tol=0.1, include=[f"*.{t}" for t in TARGETS], report=True)
    print(report.summary())
    dlrt = DLRT([p for p in model.parameters() if p.requires_grad], lr=0.3, integrator="augmented-bug", tol=0.1,
                model=model)
    ranks = ActiveRankCallback()
    start = time.perf_counter()
    transformers.Trainer(model=model, args=trainer_args(sz, os.path.join(work, "dlrt"), 0.3, args.smoke),
                         train_dataset=train, optimizers=(dlrt, None), callbacks=[ranks]).train()
    final = list(ranks.history[-1][1].values())
    rows.append(["adapters r<=16 + DLRT aug-BUG (Trainer)", "0.3",
                 sum(p.numel() for p in model.parameters() if p.requires_grad),
                 f"{sum(final) / len(final):.1f} [{min(final)}, {max(final)}]", val_loss(model, val),
                 (time.perf_counter() - start) / sz["steps"]])

    table = _common.format_table(["method", "lr", "trainable", "final ranks", "val loss (nats/byte)", "s / step"], rows)
    _common.report("hf_finetune", f"Byte-level Llama (hidden 64, 2 layers), {sz['pretrain']} pre-training steps on "
                                  f"Lib/*.py, {sz['steps']} fine-tuning steps on asyncio, seed {args.seed}\n\n{table}")

    # 3. adapters alone -> safetensors -> a fresh base; then merge and save_pretrained
    model.eval()
    x = torch.stack([d["input_ids"] for d in val[:4]])
    with torch.no_grad():
        out = model(input_ids=x).logits
    save_lowrank(model, os.path.join(work, "adapters"))
    size = os.path.getsize(os.path.join(work, "adapters", "lowrank.safetensors"))
    reloaded = load_lowrank(fresh_base(), os.path.join(work, "adapters")).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=x).logits, out)
    print(f"adapters saved ({size / 1024:.0f} KiB) and loaded into a fresh base: bit-identical logits {same}")
    merged = export_dense(model)
    merged.save_pretrained(os.path.join(work, "merged"))
    again = transformers.LlamaForCausalLM.from_pretrained(os.path.join(work, "merged")).eval()
    with torch.no_grad():
        err = float((again(input_ids=x).logits - out).abs().max())
    if not args.no_plot and ranks.history:
        plot_ranks(ranks.history)
    print(f"merged model reloaded by from_pretrained: max |d logits| = {err:.2e}")


if __name__ == "__main__":
    main()
