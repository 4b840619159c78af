#!/usr/bin/env python3
"""transformers' side of benchmarks/hf.sh (see there): make a randomly initialised model of
google/switch-base-8's exact configuration, or time transformers on it.

    hf_bench.py make DIR                 write DIR (config.json, model.safetensors; ~2.5 GB f32)
    hf_bench.py time DIR --threads N --batch B --src-len S --new-tokens T --repeat R
                     [--dtype float32|bfloat16]
                                         print one JSON line: encoder tokens/s, greedy
                                         generation tokens/s (with transformers' cache), peak RSS;
                                         the model computed in --dtype (default float32)
    hf_bench.py finetune DIR --threads N --batch B --src-len S --tgt-len T --steps K
                                         print one JSON line: fine-tuning as Trainer does it
                                         (train mode, the loss with output_router_logits,
                                         clip_grad_norm_ 1.0, AdamW with Trainer's groups, linear
                                         schedule), f32: target tokens/s and seconds per update
                                         over the updates after the first, peak RSS
"""

import argparse
import json
import resource
import sys
import time

import torch
import transformers
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

# google/switch-base-8's config.json (the fields that shape the model).
SWITCH_BASE_8 = dict(
    vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
    num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_heads=12, num_experts=8,
    expert_capacity=64, router_bias=False, router_jitter_noise=0.01, router_dtype="float32",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, dense_act_fn="relu", tie_word_embeddings=True, pad_token_id=0,
    eos_token_id=1, decoder_start_token_id=0,
)


def make(out):
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**SWITCH_BASE_8))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    print(f"{out}: {n / 1e6:.0f}M parameters")


def inputs(batch, src_len, vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (batch, src_len), generator=g)
    return ids, torch.ones_like(ids)


def timed(f, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def time_it(a):
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(a.dir, dtype=dtype).eval()
    ids, mask = inputs(a.batch, a.src_len, model.config.vocab_size)
    enc = model.get_encoder()
    with torch.inference_mode():
        enc(input_ids=ids, attention_mask=mask)  # warm-up
        enc_s = timed(lambda: enc(input_ids=ids, attention_mask=mask), a.repeat)
        gen = lambda: model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=a.new_tokens,
            min_new_tokens=a.new_tokens, use_cache=True,
        )
        out = gen()
        assert out.shape[1] == a.new_tokens + 1, out.shape
        gen_s = timed(gen, a.repeat)
    print(json.dumps({
        "impl": f"transformers {transformers.__version__} (torch {torch.__version__})",
        "threads": a.threads, "compute": a.dtype, "batch": a.batch, "src_len": a.src_len, "new_tokens": a.new_tokens,
        "encoder_tokens_per_s": a.batch * a.src_len / enc_s,
        "generate_tokens_per_s": a.batch * a.new_tokens / gen_s,
        "encoder_s": enc_s, "generate_s": gen_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def finetune(a):
    from transformers.optimization import get_linear_schedule_with_warmup

    torch.set_num_threads(a.threads)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(a.dir, dtype=torch.float32).train()
    no_decay = ("bias", "layer_norm")
    params = list(model.named_parameters())
    groups = [
        dict(params=[p for n, p in params if not any(k in n for k in no_decay)], weight_decay=0.0),
        dict(params=[p for n, p in params if any(k in n for k in no_decay)], weight_decay=0.0),
    ]
    opt = torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, 0, a.steps)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (a.batch, a.src_len), generator=g)
    labels = torch.randint(2, 100, (a.batch, a.tgt_len), generator=g)
    mask = torch.ones_like(ids)

    def update():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return out.loss.item()

    update()  # the first update allocates the optimizer's state
    t = time.perf_counter()
    for _ in range(a.steps - 1):
        update()
    s = (time.perf_counter() - t) / (a.steps - 1)
    print(json.dumps({
        "impl": f"transformers {transformers.__version__} (torch {torch.__version__})",
        "threads": a.threads, "batch": a.batch, "src_len": a.src_len, "tgt_len": a.tgt_len,
        "updates_timed": a.steps - 1, "update_s": s, "target_tokens_per_s": a.batch * a.tgt_len / s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    t = sub.add_parser("time")
    t.add_argument("dir")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--src-len", type=int, default=64)
    t.add_argument("--new-tokens", type=int, default=32)
    t.add_argument("--repeat", type=int, default=3)
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    f = sub.add_parser("finetune")
    f.add_argument("dir")
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--batch", type=int, default=4)
    f.add_argument("--src-len", type=int, default=64)
    f.add_argument("--tgt-len", type=int, default=16)
    f.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    if a.cmd == "make":
        make(a.dir)
    elif a.cmd == "finetune":
        finetune(a)
    else:
        time_it(a)


if __name__ == "__main__":
    sys.exit(main())
