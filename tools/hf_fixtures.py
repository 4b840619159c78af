#!/usr/bin/env python3
"""Hugging Face Switch Transformers fixtures for `switch parity DIR`, made with transformers.

Set-up (once; pins the release whose router decides capacity per sequence):

    python3 -m venv .venv-hf && .venv-hf/bin/pip install torch transformers==5.24.0 tokenizers safetensors

Then `.venv-hf/bin/python tools/hf_fixtures.py` rewrites tests/data/hf/ (the committed fixtures),
and `.venv-hf/bin/python tools/hf_fixtures.py --shapes OUT` writes fixtures of other shapes to OUT
(not committed: `switch parity OUT/*` checks them).

A fixture is a directory:
    config.json, model.safetensors (or shards + model.safetensors.index.json)  save_pretrained
    tokenizer.json                                                             the test tokenizer
    expected.safetensors:
        input_ids, attention_mask   i64 [batch, src]   encoder input, padded rows included
        decoder_input_ids           i64 [batch, tgt]
        logits                      f32 [batch, tgt, vocab]   eval mode
        encoder_last_hidden_state   f32 [batch, src, d_model]
        generated_ids               i64 [batch, 11]  decoder start + 10 greedy tokens, decoded
                                    with transformers' cache, the encoder mask applied, EOS not
                                    stopping it
    with metadata `meta`: the transformers and torch versions and what the fixture exercises.

Weights are random (seeded) with layer-norm scales around 1 and a sharp router, and capacities
small enough that tokens are dropped (the script checks that they are).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

if transformers.__version__ != "5.24.0":
    sys.exit(f"transformers {transformers.__version__}: these fixtures pin 5.24.0 (see the docstring)")

ROOT = Path(__file__).resolve().parent.parent
N_SENTINELS = 10
TEXT = """The quick brown fox jumps over the lazy dog. A dog walks in the park.
The cute dog walks in the green park. Sparse experts route every token to one expert.
Each expert takes at most its capacity of tokens and drops the rest.
Switch Transformers scale to a trillion parameters with the same compute per token.
The router sends each token to its most probable expert; the output is scaled by that probability.
To be, or not to be, that is the question. All the world's a stage.
"""


def make_tokenizer(path: Path) -> Tokenizer:
    """A tiny T5-like Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, pieces, then <extra_id_9..0>."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(TEXT.splitlines(), trainer)
    # T5 puts the sentinels at the end, <extra_id_0> last.
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(N_SENTINELS))])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(path))
    return tok


def randomise(model: SwitchTransformersForConditionalGeneration, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "router.classifier" in name or "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(".q.weight"):
                # T5 folds the 1/sqrt(d_kv) scaling into q's initialisation; sharper attention
                # here makes positions and the cache matter to the greedy tokens.
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            elif name.endswith((".o.weight", ".wo.weight")):
                p.mul_(4.0)  # blocks that move the residual stream off the input embedding


def encode_batch(tok: Tokenizer, texts):
    """Right-padded to the longest text (none truncated)."""
    src_len = max(len(tok.encode(t).ids) for t in texts)
    ids = torch.zeros(len(texts), src_len, dtype=torch.long)
    mask = torch.zeros(len(texts), src_len, dtype=torch.long)
    for r, t in enumerate(texts):
        e = tok.encode(t).ids
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1
    return ids, mask


def greedy_with_cache(model, input_ids, attention_mask, start: int, steps: int):
    """Greedy decoding as transformers' generate does it (one token at a time, its cache)."""
    enc = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    out = torch.full((input_ids.shape[0], 1), start, dtype=torch.long)
    cache = None
    for _ in range(steps):
        r = model(
            encoder_outputs=enc,
            attention_mask=attention_mask,
            decoder_input_ids=out[:, -1:],
            past_key_values=cache,
            use_cache=True,
        )
        cache = r.past_key_values
        out = torch.cat([out, r.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def count_drops(model, input_ids, attention_mask, decoder_input_ids):
    """Tokens dropped (over capacity) in every sparse layer, from the router's dispatch mask."""
    drops = []

    def hook(module, args, out):
        expert_index, _, logits = out
        routed = torch.nn.functional.one_hot(logits.argmax(-1), module.num_experts)
        drops.append(int((routed.sum(-1) - expert_index.sum(-1)).sum()))

    hs = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__.endswith("Top1Router")]
    model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    for h in hs:
        h.remove()
    return drops


def save_expected(path: Path, input_ids, attention_mask, decoder_input_ids, result, generated, meta: dict) -> None:
    """expected.safetensors in the layout the docstring gives, `meta` as its metadata."""
    save_file(
        {
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask.contiguous(),
            "decoder_input_ids": decoder_input_ids.contiguous(),
            "logits": result.logits.float().contiguous(),
            "encoder_last_hidden_state": result.encoder_last_hidden_state.float().contiguous(),
            "generated_ids": generated.contiguous(),
        },
        str(path),
        metadata={"meta": json.dumps(meta)},
    )


def make_fixture(out: Path, tok_path: Path, tok: Tokenizer, spec: dict, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = dict(spec["config"])
    cfg.update(vocab_size=tok.get_vocab_size(), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    config = SwitchTransformersConfig(**cfg)
    model = SwitchTransformersForConditionalGeneration(config).eval()
    randomise(model, seed)
    dtype = spec.get("dtype", "float32")
    if dtype != "float32":
        # Weights representable in the stored precision; the expected values are computed in f32.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(getattr(torch, dtype)).to(torch.float32))

    texts = spec["texts"]
    input_ids, attention_mask = encode_batch(tok, texts)
    if attention_mask.all():
        sys.exit(f"{out.name}: no padded row; give texts of different lengths")
    g = torch.Generator().manual_seed(seed + 1)
    decoder_input_ids = torch.randint(3, tok.get_vocab_size(), (len(texts), spec["tgt_len"]), generator=g)
    decoder_input_ids[:, 0] = 0
    with torch.no_grad():
        r = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
        generated = greedy_with_cache(model, input_ids, attention_mask, 0, 10)
        drops = count_drops(model, input_ids, attention_mask, decoder_input_ids)
    if sum(drops) == 0:
        sys.exit(f"{out.name}: no token dropped; lower expert_capacity")

    if out.exists():
        shutil.rmtree(out)
    save_dtype = getattr(torch, dtype)
    model.to(save_dtype).save_pretrained(out, max_shard_size=spec.get("shard", "50GB"))
    shutil.copy(tok_path, out / "tokenizer.json")
    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": seed,
        "weights_dtype": dtype,
        "dropped_per_sparse_layer": drops,
        "texts": texts,
        "about": spec["about"],
    }
    save_expected(out / "expected.safetensors", input_ids, attention_mask, decoder_input_ids, r, generated, meta)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 1024:.0f} kB, dropped per sparse layer {drops}")
    print("  generated:", generated.tolist())


TEXTS = [
    "The <extra_id_0> walks in <extra_id_1> park.",
    "A quick brown fox.",
    "Each expert takes at most its capacity of tokens and drops the rest.",
]

COMMITTED = {
    # Tied embeddings (output scaled by d_model^-0.5), 2 of 4 encoder blocks sparse, every
    # decoder block sparse, capacity 2 per sequence.
    "tiny": dict(
        config=dict(
            d_model=16, d_kv=4, d_ff=24, num_heads=4, num_layers=4, num_sparse_encoder_layers=2,
            num_decoder_layers=3, num_sparse_decoder_layers=3, num_experts=4, expert_capacity=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=12,
        ),
        texts=TEXTS, tgt_len=7,
        about="f32; tied embeddings; encoder sparse step 2, decoder sparse step 1; padded rows",
    ),
    # bf16 weights in shards; untied output layer; one sparse encoder block of 3, 8 experts,
    # capacity 1.
    "tiny-bf16-sharded": dict(
        config=dict(
            d_model=24, d_kv=6, d_ff=16, num_heads=2, num_layers=3, num_sparse_encoder_layers=1,
            num_decoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, expert_capacity=1,
            relative_attention_num_buckets=6, relative_attention_max_distance=10,
            tie_word_embeddings=False,
        ),
        texts=TEXTS[:2], tgt_len=5, dtype="bfloat16", shard="40KB",
        about="bf16 weights, sharded; untied lm_head; encoder sparse step 3; capacity 1",
    ),
    # f16 weights, router bias.
    "tiny-f16": dict(
        config=dict(
            d_model=8, d_kv=4, d_ff=12, num_heads=2, num_layers=2, num_sparse_encoder_layers=2,
            num_decoder_layers=2, num_sparse_decoder_layers=1, num_experts=2, expert_capacity=3,
            relative_attention_num_buckets=4, relative_attention_max_distance=8, router_bias=True,
        ),
        texts=TEXTS, tgt_len=6, dtype="float16",
        about="f16 weights; router bias; encoder sparse step 1, decoder sparse step 2",
    ),
}


def other_shapes():
    """Wider, deeper, more experts, other vocab use: for `--shapes` (not committed)."""
    specs = {}
    for i, (d, h, kv, ff, l, se, dl, sd, e, c) in enumerate(
        [
            (32, 4, 8, 48, 6, 3, 4, 2, 16, 2),
            (40, 5, 8, 32, 2, 1, 3, 3, 3, 1),
            (64, 8, 8, 128, 8, 4, 8, 8, 32, 4),
            (12, 1, 12, 20, 5, 5, 1, 1, 6, 2),
        ]
    ):
        specs[f"shape{i}"] = dict(
            config=dict(
                d_model=d, num_heads=h, d_kv=kv, d_ff=ff, num_layers=l, num_sparse_encoder_layers=se,
                num_decoder_layers=dl, num_sparse_decoder_layers=sd, num_experts=e, expert_capacity=c,
                relative_attention_num_buckets=[8, 16, 32, 4][i], relative_attention_max_distance=[16, 40, 128, 6][i],
                tie_word_embeddings=i % 2 == 0,
            ),
            texts=TEXTS + ["To be, or not to be."] * (i % 2), tgt_len=[9, 4, 12, 3][i],
            about=f"other shape {i}",
        )
    return specs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=Path, help="write fixtures of other shapes here instead")
    a = p.parse_args()
    out = a.shapes or ROOT / "tests" / "data" / "hf"
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json.tmp"
    tok = make_tokenizer(tok_path)
    specs = other_shapes() if a.shapes else COMMITTED
    for i, (name, spec) in enumerate(specs.items()):
        make_fixture(out / name, tok_path, tok, spec, seed=1000 + i)
    tok_path.unlink()


if __name__ == "__main__":
    main()
