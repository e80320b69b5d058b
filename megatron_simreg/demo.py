"""``megatron-simreg demo``: SimReg and JREG on a small byte-level LM, on CPU.

It trains the same tiny pre-norm Transformer (same seed, same data order)
three times: baseline, ``+ lambda * SimReg`` and ``+ alpha * JREG``, on the
Python standard library's own source files (real text present on every
machine, no download), then prints a table of held-out LM loss, intra- vs
inter-label cosine similarity and the final-layer jump strength.

This is a plain-PyTorch showcase of the loss library; the Megatron-core
pretraining demo replaces it once the trainer lands.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn

from .analysis.representations import label_cosine_similarity
from .config import JRegConfig, SimRegConfig
from .losses import jreg_penalty, jump_strength, layer_angular_distances, simreg_loss


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--simreg-weight", type=float, default=SimRegConfig.weight)
    p.add_argument("--simreg-temperature", type=float, default=SimRegConfig.temperature)
    p.add_argument("--jreg-weight", type=float, default=JRegConfig.weight)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000, help="bytes of stdlib source to use")


def stdlib_corpus(max_bytes: int) -> torch.Tensor:
    """The standard library's ``.py`` files, in sorted order, as a byte tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


class TinyLM(nn.Module):
    """Pre-norm causal Transformer over bytes; returns logits and every layer boundary state."""

    def __init__(self, hidden: int, layers: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(256, hidden)
        self.pos = nn.Parameter(torch.randn(seq, hidden) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, max(1, hidden // 32), 4 * hidden, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 256, bias=False)

    def forward(self, tokens):  # tokens [b, s]
        s = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(s)
        x = self.embed(tokens) + self.pos[:s]
        states = [x]
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
            states.append(x)
        final = self.norm(x)  # [b, s, h], what the LM head classifies
        return self.head(final), final, states


def run(args, name: str, simreg_w: float, jreg_w: float, data: torch.Tensor, heldout: torch.Tensor):
    torch.manual_seed(args.seed)
    model = TinyLM(args.hidden_size, args.num_layers, args.seq_length)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)  # same batches for every method
    ce = nn.CrossEntropyLoss()
    s, b = args.seq_length, args.micro_batch_size
    start = time.perf_counter()
    for it in range(args.train_iters):
        idx = torch.randint(0, data.numel() - s - 1, (b,), generator=gen)
        batch = torch.stack([data[i:i + s + 1] for i in idx])
        tokens, labels = batch[:, :-1], batch[:, 1:]
        lr = args.lr * min(1.0, (it + 1) / 20) * 0.5 * (1 + math.cos(math.pi * it / args.train_iters))
        for g in opt.param_groups:
            g["lr"] = lr
        logits, final, states = model(tokens)
        loss = ce(logits.reshape(-1, 256), labels.reshape(-1))
        if simreg_w:
            loss = loss + simreg_w * simreg_loss(final, labels, temperature=args.simreg_temperature)
        if jreg_w:
            loss = loss + jreg_w * jreg_penalty(layer_angular_distances(states))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        tokens, labels = heldout[:, :-1], heldout[:, 1:]
        logits, final, states = model(tokens)
        val = ce(logits.reshape(-1, 256), labels.reshape(-1)).item()
        intra, inter = label_cosine_similarity(final, labels)
        d = layer_angular_distances(states)
    return dict(method=name, val_loss=val, intra=intra, inter=inter, d_last=d[-1].item(),
                jump=jump_strength(d).item(), seconds=elapsed)


def main(args) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = stdlib_corpus(args.corpus_bytes)
    split = int(0.95 * corpus.numel())
    data, rest = corpus[:split], corpus[split:]
    n = min(32, rest.numel() // (args.seq_length + 1))
    heldout = rest[: n * (args.seq_length + 1)].view(n, args.seq_length + 1)
    print(f"corpus: {corpus.numel():,} bytes of Python stdlib source; model: {args.num_layers} layers x "
          f"{args.hidden_size} hidden; {args.train_iters} iters x {args.micro_batch_size} x {args.seq_length} tokens")
    rows = [
        run(args, "baseline", 0.0, 0.0, data, heldout),
        run(args, f"simreg (lambda={args.simreg_weight})", args.simreg_weight, 0.0, data, heldout),
        run(args, f"jreg (alpha={args.jreg_weight})", 0.0, args.jreg_weight, data, heldout),
    ]
    header = f"{'method':<24}{'val loss':>10}{'intra cos':>11}{'inter cos':>11}{'d_L':>8}{'jump':>8}{'time s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<24}{r['val_loss']:>10.4f}{r['intra']:>11.4f}{r['inter']:>11.4f}"
              f"{r['d_last']:>8.4f}{r['jump']:>8.2f}{r['seconds']:>8.1f}")
    return 0
