#!/usr/bin/env python3
"""A dense T5 for `switch upcycle --model`, and the check that transformers loads what it makes.

Set-up as in tools/hf_fixtures.py (transformers 5.24.0 in .venv-hf). Then

    .venv-hf/bin/python tools/hf_upcycle_fixtures.py

rewrites tests/data/hf-upcycle/t5-tiny/: a random T5ForConditionalGeneration (relu FFNs, tied
embeddings: T5 v1.0's layout) saved by save_pretrained, the test tokenizer, and
expected.safetensors with the dense model's outputs in the layout of tools/hf_fixtures.py (so
`switch parity` replays them against any model folder they are copied into). And

    .venv-hf/bin/python tools/hf_upcycle_fixtures.py --check target/release/switch

upcycles that T5 with the binary (4 experts, both router starts), loads each result with
transformers' SwitchTransformersForConditionalGeneration and prints how far its logits are from
the dense T5's, then records transformers' outputs of the upcycled model (tools/hf_expect.py's
layout) so that `switch parity` compares ours with transformers' on it; those of the `paper`
start (seed 0) are kept as t5-tiny/upcycled-paper-expected.safetensors for the tests.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import SwitchTransformersForConditionalGeneration, T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_fixtures import TEXTS, encode_batch, greedy_with_cache, make_tokenizer, randomise, save_expected  # noqa: E402

if transformers.__version__ != "5.24.0":
    sys.exit(f"transformers {transformers.__version__}: these fixtures pin 5.24.0 (see tools/hf_fixtures.py)")

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "hf-upcycle" / "t5-tiny"
SEED = 2000


def outputs(model, input_ids, attention_mask, dec):
    with torch.no_grad():
        r = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec)
        generated = greedy_with_cache(model, input_ids, attention_mask, 0, 10)
    return r, generated


def make_fixture():
    tmp = Path(tempfile.mkdtemp())
    tok = make_tokenizer(tmp / "tokenizer.json")
    torch.manual_seed(SEED)
    config = T5Config(
        vocab_size=tok.get_vocab_size(), d_model=16, d_kv=4, d_ff=24, num_heads=4, num_layers=4,
        num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config).eval()
    randomise(model, SEED)
    input_ids, attention_mask = encode_batch(tok, TEXTS)
    g = torch.Generator().manual_seed(SEED + 1)
    dec = torch.randint(3, tok.get_vocab_size(), (len(TEXTS), 7), generator=g)
    dec[:, 0] = 0
    r, generated = outputs(model, input_ids, attention_mask, dec)
    if FIXTURE.exists():
        shutil.rmtree(FIXTURE)
    model.save_pretrained(FIXTURE)
    shutil.copy(tmp / "tokenizer.json", FIXTURE / "tokenizer.json")
    meta = dict(transformers=transformers.__version__, torch=torch.__version__, seed=SEED, texts=TEXTS,
                about="the dense T5's outputs (T5ForConditionalGeneration, relu, tied), "
                      "written by tools/hf_upcycle_fixtures.py")
    save_expected(FIXTURE / "expected.safetensors", input_ids, attention_mask, dec, r, generated, meta)
    size = sum(f.stat().st_size for f in FIXTURE.iterdir())
    print(f"{FIXTURE}: {size / 1024:.0f} kB; tensors {sorted(model.state_dict())[:3]}...")
    print("  generated:", generated.tolist())


def check(binary: Path):
    from safetensors.torch import load_file

    want = load_file(str(FIXTURE / "expected.safetensors"))
    args = (want["input_ids"], want["attention_mask"], want["decoder_input_ids"])
    dense = want["logits"]
    work = Path(tempfile.mkdtemp())
    for router in ["zero", "paper"]:
        out = work / router
        subprocess.run(
            [str(binary), "upcycle", "--model", str(FIXTURE), "--out", str(out), "--experts", "4",
             "--router", router, "--expert-capacity", "64"],
            check=True,
        )
        model = SwitchTransformersForConditionalGeneration.from_pretrained(out).float().eval()
        r, generated = outputs(model, *args)
        diff = (r.logits - dense).abs().max().item()
        rel = diff / dense.abs().max().item()
        same = bool((generated == want["generated_ids"]).all())
        print(f"router {router}: transformers loads it; logits vs the dense T5: max abs {diff:.3g} "
              f"(relative to the largest {rel:.3g}); greedy tokens {'equal' if same else 'differ'}")
        shutil.copy(FIXTURE / "expected.safetensors", out / "dense-expected.safetensors")
        subprocess.run([sys.executable, str(ROOT / "tools" / "hf_expect.py"), str(out)], check=True)
        subprocess.run([str(binary), "parity", str(out)], check=True)
        if router == "paper":
            # Committed: the test upcycles with the same seed and replays these.
            shutil.copy(out / "expected.safetensors", FIXTURE / "upcycled-paper-expected.safetensors")
    shutil.rmtree(work)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", type=Path, metavar="SWITCH_BINARY")
    a = p.parse_args()
    if a.check:
        check(a.check)
    else:
        make_fixture()


if __name__ == "__main__":
    main()
