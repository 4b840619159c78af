#!/usr/bin/env python3
"""Records what transformers 5.24.0 computes with a model folder that this project wrote
(`switch finetune`, `switch convert`, `switch upcycle`), so that `switch parity DIR` compares:
transformers loads it, and our logits, encoder output and greedy tokens equal its.

    .venv-hf/bin/python tools/hf_expect.py DIR [--text "..."]...

writes DIR/expected.safetensors in the layout of tools/hf_fixtures.py (the model's own
tokenizer.json encodes the texts); then `switch parity DIR`.
"""

import argparse
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from transformers import SwitchTransformersForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_fixtures import TEXTS, encode_batch, greedy_with_cache, save_expected  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--text", action="append", help="input texts (default: the fixtures')")
    a = p.parse_args()
    texts = a.text or TEXTS
    model = SwitchTransformersForConditionalGeneration.from_pretrained(a.dir).float().eval()
    tok = Tokenizer.from_file(str(a.dir / "tokenizer.json"))
    input_ids, attention_mask = encode_batch(tok, texts)
    start = model.config.decoder_start_token_id
    g = torch.Generator().manual_seed(0)
    dec = torch.randint(3, model.config.vocab_size, (len(texts), 6), generator=g)
    dec[:, 0] = start
    with torch.no_grad():
        r = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec)
        generated = greedy_with_cache(model, input_ids, attention_mask, start, 10)
    meta = dict(transformers=transformers.__version__, torch=torch.__version__, texts=texts,
                about=f"transformers' outputs for {a.dir.name}, written by tools/hf_expect.py")
    save_expected(a.dir / "expected.safetensors", input_ids, attention_mask, dec, r, generated, meta)
    print(f"{a.dir}: transformers loaded it; generated {generated.tolist()}")


if __name__ == "__main__":
    main()
