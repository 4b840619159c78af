"""Times labml's real Switch Transformer (labml-nn from PyPI) training steps, exactly as
labml_nn.transformers.switch.experiment builds and steps it, and prints one JSON object.

Usage: python labml_bench.py --experts 4 --threads 2 --steps 20 --warmup 5
"""
import argparse
import json
import resource
import statistics
import time

import torch
from torch import nn

from labml import tracker

# labml-nn 0.5.1's MultiHeadAttention calls tracker.debug, which labml 0.5.3 on PyPI lacks;
# it only records debug statistics, so a no-op stands in for it.
if not hasattr(tracker, "debug"):
    tracker.debug = lambda *args, **kwargs: None

from labml_nn.optimizers.noam import Noam
from labml_nn.transformers import MultiHeadAttention
from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.switch import SwitchFeedForward, SwitchTransformer, SwitchTransformerLayer
from labml_nn.transformers.utils import subsequent_mask


class AutoregressiveModel(nn.Module):
    """labml_nn.transformers.switch.experiment.AutoregressiveModel (copied here only so the
    experiment module, which pulls in labml's experiment configs, need not be imported)."""

    def __init__(self, n_vocab, d_model, transformer):
        super().__init__()
        self.src_embed = nn.Embedding(n_vocab, d_model)
        self.transformer = transformer
        self.generator = nn.Linear(d_model, n_vocab)
        self.mask = None

    def forward(self, x):
        if self.mask is None or self.mask.size(0) != len(x):
            self.mask = subsequent_mask(len(x)).to(x.device)
        x = self.src_embed(x)
        res, counts, route_prob, n_dropped, route_prob_max = self.transformer(x, self.mask)
        return self.generator(res), counts, route_prob, n_dropped, route_prob_max


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    n_vocab = 65
    layer = SwitchTransformerLayer(
        d_model=a.d_model,
        attn=MultiHeadAttention(a.heads, a.d_model, 0.0),
        feed_forward=SwitchFeedForward(
            capacity_factor=1.2, drop_tokens=True, is_scale_prob=True, n_experts=a.experts,
            expert=FeedForward(a.d_model, a.d_ff, 0.0), d_model=a.d_model),
        dropout_prob=0.0)
    model = AutoregressiveModel(n_vocab, a.d_model, SwitchTransformer(layer, a.layers))
    opt = Noam(model.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8, warmup=2000, d_model=a.d_model)
    loss_func = nn.CrossEntropyLoss()
    times = []
    for i in range(a.warmup + a.steps):
        data = torch.randint(0, n_vocab, (a.seq_len, a.batch))
        target = torch.randint(0, n_vocab, (a.seq_len, a.batch))
        t0 = time.perf_counter()
        output, counts, route_prob, n_dropped, route_prob_max = model(data)
        loss = loss_func(output.view(-1, output.shape[-1]), target.view(-1))
        total = counts.sum(dim=-1, keepdims=True)
        lb = a.experts * ((counts / total) * (route_prob / total)).sum()
        loss = loss + 0.01 * lb
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        opt.zero_grad()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    tokens = a.batch * a.seq_len
    print(json.dumps({
        "impl": "labml-pytorch",
        "torch": torch.__version__,
        "threads": a.threads,
        "experts": a.experts,
        "layers": a.layers,
        "d_model": a.d_model,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "params": sum(p.numel() for p in model.parameters()),
        "ms_per_step_median": med,
        "ms_per_step_min": min(times),
        "tokens_per_s_median": tokens / (med / 1e3),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
