#!/usr/bin/env python3
"""Fine-tuning fixtures for `switch finetune`, recorded with transformers 5.24.0 (issue 27).

Set-up as for tools/hf_fixtures.py (a venv with torch, transformers==5.24.0, tokenizers,
safetensors), then `.venv-hf/bin/python tools/hf_finetune_fixtures.py` rewrites
tests/data/hf-finetune/*/ (apart from tests/data/hf, whose folders are
forward-parity fixtures).

Each fixture is a small random SwitchTransformersForConditionalGeneration (tied embeddings,
sparse encoder and decoder blocks, padding in inputs and targets, tokens dropped by capacity,
z-loss and load-balancing loss on, dropout and router jitter 0 so that runs are exact), trained
as transformers' Trainer trains it: the model's loss with output_router_logits=True, the
micro-batches' losses divided by their count and backpropagated, clip_grad_norm_, torch.optim.AdamW
with Trainer's parameter groups (no decay on biases and norms), get_linear_schedule_with_warmup.

    config.json, model.safetensors    the weights before training (save_pretrained)
    expected.safetensors:
        mbK.input_ids, mbK.attention_mask, mbK.labels, mbK.decoder_input_ids   micro-batch K
        loss, cross_entropy, encoder_z_loss, encoder_aux_loss, decoder_z_loss, decoder_aux_loss
                                      f32 [1]: of the first micro-batch, before training
        grad.NAME                     the first update's gradient (all micro-batches), before
                                      clipping; absent where no gradient reached NAME
        after.NAME                    every weight after 3 updates
        losses                        f32 [3]: each update's mean loss over its micro-batches
    metadata `meta`: versions, the optimisation settings, the inputs and targets as token ids,
    drops per sparse layer, parameters without a gradient.

Also `start/`: a small model as transformers initialises it, which the end-to-end test
fine-tunes on generated pairs.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.optimization import get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_fixtures import TEXTS, make_tokenizer, randomise  # noqa: E402

if transformers.__version__ != "5.24.0":
    sys.exit(f"transformers {transformers.__version__}: these fixtures pin 5.24.0")

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [
    "the cute dog",
    "A fox jumps over the dog in the park.",
    "experts drop tokens",
]

SPECS = {
    # Both stacks with a sparse step of 2 (router losses on in both), one micro-batch.
    "step2": dict(
        config=dict(
            d_model=16, d_kv=4, d_ff=24, num_heads=4, num_layers=4, num_sparse_encoder_layers=2,
            num_decoder_layers=4, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=12,
            router_z_loss_coef=0.1, router_aux_loss_coef=0.05,
        ),
        micro=[[0, 1, 2]],
        opt=dict(lr=3e-3, weight_decay=0.01, warmup=1, total=4, max_grad_norm=1.0),
        about="sparse step 2 in both stacks; one micro-batch of 3; weight decay; warm-up 1 of 4",
    ),
    # Router bias; every decoder block sparse (step 1: transformers adds no decoder router
    # losses); two micro-batches accumulated; clipping off.
    "accum": dict(
        config=dict(
            d_model=12, d_kv=3, d_ff=20, num_heads=4, num_layers=3, num_sparse_encoder_layers=1,
            num_decoder_layers=2, num_sparse_decoder_layers=2, num_experts=3, expert_capacity=1,
            relative_attention_num_buckets=6, relative_attention_max_distance=10, router_bias=True,
            router_z_loss_coef=0.2, router_aux_loss_coef=0.1,
        ),
        micro=[[0, 2], [1]],
        opt=dict(lr=1e-2, weight_decay=0.0, warmup=0, total=3, max_grad_norm=0.0),
        about="router bias; decoder sparse step 1 (no decoder router losses); 2 micro-batches accumulated; no clipping",
    ),
}


def pad_rows(rows, value):
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long)


def batch(tok, idx):
    inputs = [tok.encode(TEXTS[i]).ids for i in idx]
    targets = [tok.encode(TARGETS[i]).ids for i in idx]
    input_ids = pad_rows(inputs, 0)
    mask = pad_rows([[1] * len(r) for r in inputs], 0)
    labels = pad_rows(targets, -100)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels), inputs, targets


def drops_of(model, b):
    drops = []

    def hook(module, args, out):
        expert_index, _, logits = out
        routed = torch.nn.functional.one_hot(logits.argmax(-1), module.num_experts)
        drops.append(int((routed.sum(-1) - expert_index.sum(-1)).sum()))

    hs = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__.endswith("Top1Router")]
    with torch.no_grad():
        model(**b, output_router_logits=True)
    for h in hs:
        h.remove()
    return drops


def decay_names(model):
    # Trainer.get_decay_parameter_names, for this model (no nn.LayerNorm modules in it).
    import re
    pats = [re.compile(p) for p in [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]]
    return {n for n, _ in model.named_parameters() if not any(p.search(n.lower()) for p in pats)}


def make(out: Path, tok_path: Path, tok, spec: dict, seed: int):
    torch.manual_seed(seed)
    cfg = dict(spec["config"])
    cfg.update(vocab_size=tok.get_vocab_size(), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
               dropout_rate=0.0, router_jitter_noise=0.0)
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**cfg))
    randomise(model, seed)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    shutil.copy(tok_path, out / "tokenizer.json")
    model.train()

    tensors, micro, ids_meta = {}, [], []
    for k, idx in enumerate(spec["micro"]):
        b, inputs, targets = batch(tok, idx)
        b["decoder_input_ids"] = model._shift_right(b["labels"])
        micro.append(b)
        ids_meta.append(dict(inputs=inputs, targets=targets))
        for name, t in b.items():
            tensors[f"mb{k}.{name}"] = t.contiguous()
    drops = [drops_of(model, b) for b in micro]
    if sum(sum(d) for d in drops) == 0:
        sys.exit(f"{out.name}: no token dropped; lower expert_capacity")

    o = spec["opt"]
    decay = decay_names(model)
    params = list(model.named_parameters())
    groups = [
        dict(params=[p for n, p in params if n in decay], weight_decay=o["weight_decay"]),
        dict(params=[p for n, p in params if n not in decay], weight_decay=0.0),
    ]
    opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, o["warmup"], o["total"])

    losses, no_grad = [], []
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        mean = 0.0
        for k, b in enumerate(micro):
            r = model(**b, output_router_logits=True)
            if step == 0 and k == 0:
                for key, v in [("loss", r.loss), ("cross_entropy", None),
                               ("encoder_z_loss", r.encoder_z_loss), ("encoder_aux_loss", r.encoder_aux_loss),
                               ("decoder_z_loss", r.decoder_z_loss), ("decoder_aux_loss", r.decoder_aux_loss)]:
                    if key == "cross_entropy":
                        ce = torch.nn.functional.cross_entropy(
                            r.logits.view(-1, r.logits.size(-1)), b["labels"].view(-1), ignore_index=-100)
                        v = ce
                    v = torch.as_tensor(v, dtype=torch.float32).detach().reshape(1)
                    tensors[key] = v.contiguous()
            mean += r.loss.item() / len(micro)
            (r.loss / len(micro)).backward()
        losses.append(mean)
        if step == 0:
            for n, p in params:
                if p.grad is None:
                    no_grad.append(n)
                else:
                    tensors[f"grad.{n}"] = p.grad.detach().clone().contiguous()
        if o["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["max_grad_norm"])
        opt.step()
        sched.step()
    for n, p in params:
        tensors[f"after.{n}"] = p.detach().clone().contiguous()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)

    meta = dict(
        transformers=transformers.__version__, torch=torch.__version__, seed=seed,
        learning_rate=o["lr"], weight_decay=o["weight_decay"], warmup_steps=o["warmup"],
        total_steps=o["total"], max_grad_norm=o["max_grad_norm"], micro_batches=ids_meta,
        dropped_per_sparse_layer=drops, no_grad=no_grad, about=spec["about"],
    )
    save_file(tensors, str(out / "expected.safetensors"), metadata={"meta": json.dumps(meta)})
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 1024:.0f} kB, losses {losses}, drops {drops}, no gradient: {no_grad}")


def make_start(out: Path, tok_path: Path, tok, seed: int):
    """A small model as transformers initialises it (no training), with capacity for every
    token of short sequences: the starting point of the end-to-end fine-tuning test."""
    torch.manual_seed(seed)
    config = SwitchTransformersConfig(
        vocab_size=tok.get_vocab_size(), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=2, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=32,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
    )
    model = SwitchTransformersForConditionalGeneration(config)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    shutil.copy(tok_path, out / "tokenizer.json")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 1024:.0f} kB, transformers' initialisation")


def main():
    out = ROOT / "tests" / "data" / "hf-finetune"
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json.tmp"
    tok = make_tokenizer(tok_path)
    for i, (name, spec) in enumerate(SPECS.items()):
        make(out / name, tok_path, tok, spec, seed=2000 + i)
    make_start(out / "start", tok_path, tok, seed=2100)
    tok_path.unlink()


if __name__ == "__main__":
    main()
