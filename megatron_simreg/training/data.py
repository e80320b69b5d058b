"""What a run reads: megatron-core's GPTDataset splits, and each iteration's micro-batches for this rank.

Sample ``i`` of the run is sample ``i`` of the train split (seeded by
``--seed``), so the data order depends only on the samples consumed so far: a
resumed run replays exactly the samples an uninterrupted run would have seen. Each
data-parallel rank takes its contiguous slice of the global batch and splits
it into micro-batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


class Batches:
    """Micro-batches of iteration ``it`` for this rank, from a map-style GPT dataset.

    A micro-batch is a dict of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, each ``[b, s]``
    (``[b, s / cp]`` after :meth:`local`), and with ``--reset-attention-mask`` ``attention_mask`` ``[b, 1, s, s]``
    (True: masked out; Megatron's convention)."""

    KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")

    def __init__(self, dataset, global_batch: int, micro_batch: int):
        from megatron.core import parallel_state as ps

        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.per_rank = global_batch // dp
        self.offset = rank * self.per_rank
        self.cp, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()

    def full(self, it: int):
        """This rank's samples of iteration ``it`` as full-sequence micro-batches."""
        return self.at(it * self.global_batch)

    def at(self, first_sample: int):
        """This rank's part of the global batch that starts at sample ``first_sample`` (Megatron-LM's consumed
        samples: a resume with another global batch size continues where the data stopped)."""
        start = first_sample + self.offset
        samples = [self.dataset[start + i] for i in range(self.per_rank)]
        out = []
        for m in range(0, self.per_rank, self.micro_batch):
            group = samples[m:m + self.micro_batch]
            out.append({k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in group])
                        for k in self.KEYS if k in group[0]})
        return out

    def fingerprint(self, iterations: int) -> str:
        """SHA-256 of the tokens of global batches ``0 .. iterations - 1`` (all ranks' samples): two runs with the
        same fingerprint evaluate the same batches, whatever their parallel layout."""
        h = hashlib.sha256()
        for i in range(iterations * self.global_batch):
            h.update(np.asarray(self.dataset[i]["tokens"], dtype=np.int64).tobytes())
        return h.hexdigest()

    def local(self, microbatches):
        """Slice each micro-batch to this CP rank's zigzag positions and move it to the device."""
        from ..parallel.simreg_parallel import zigzag_positions

        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = []
        for mb in microbatches:
            if self.cp > 1:
                pos = zigzag_positions(mb["tokens"].shape[1], self.cp, self.cp_rank)
                mb = {k: v[:, pos] for k, v in mb.items()}
            out.append({k: v.to(device) for k, v in mb.items()})
        return out


def resolve_data(args, first=lambda fn: fn()):
    """``(data_path, tokenizer_type, tokenizer_model, cache)`` of a run's flags: ``--data-path`` with its
    tokenizer, or the default corpus (built under ``--data-cache-path`` by ``first(fn)``), tokenized with
    ``--tokenizer-type``/``--tokenizer-model`` when given, else with its own sentencepiece model."""
    from ..data.default_corpus import prepare_default_corpus
    from ..data.tokenizer import SENTENCEPIECE

    cache = args.data_cache_path or os.path.join(os.path.expanduser("~"), ".cache", "megatron_simreg")
    if args.data_path:
        return args.data_path, args.tokenizer_type, args.tokenizer_model, cache
    if args.tokenizer_model:
        prefix, model = first(lambda: prepare_default_corpus(cache, tokenizer_type=args.tokenizer_type,
                                                             tokenizer_model=args.tokenizer_model))
        return [prefix], args.tokenizer_type, model, cache
    prefix, model = first(lambda: prepare_default_corpus(cache))
    return [prefix], SENTENCEPIECE, model, cache


def contamination_line(data_path, split: str, cache_file: Optional[str] = None) -> str:
    """:func:`~..data.contamination.describe` of the data's held-out splits (kept in ``cache_file`` when given:
    the default corpus's entry, so that each run does not recount it)."""
    from ..data.contamination import contamination, describe
    from ..data.datasets import parse_blend

    if cache_file and os.path.isfile(cache_file):
        with open(cache_file) as f:
            return describe(json.load(f))
    result = contamination(parse_blend(data_path)[0], split)
    if cache_file:
        with open(cache_file + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(cache_file + ".tmp", cache_file)
    return describe(result)


def build_datasets(args, gbs: int, train_samples: int):
    """``(train, valid or None, tokenizer)`` for :func:`resolve_data`'s data; a collective.

    With ``--data-path`` every dataset's largest token id is first checked against the tokenizer's vocabulary
    (``ValueError`` naming the prefix). Rank 0 prints the held-out splits' n-gram overlap with training (the
    default corpus always, ``--data-path`` with ``--check-contamination``).

    ``train_samples``: the last sample index the run will read, plus one."""
    from ..data.datasets import build_gpt_datasets, check_token_range
    from ..data.tokenizer import build_tokenizer

    data_path, tok_type, tok_model, cache = resolve_data(args, _on_rank0_first)
    tokenizer = build_tokenizer(tok_type, tok_model)
    if args.data_path:
        check_token_range(data_path, tokenizer, tok_type)  # data from another tokenizer: refused before training
    if args.mock_data:
        data_path = None  # megatron-core's MockGPTDataset: only the tokenizer's vocabulary and EOD are read
    elif (args.check_contamination or not args.data_path) and dist.get_rank() == 0:
        cached = None if args.data_path else os.path.join(os.path.dirname(data_path[0]),
                                                          f"contamination_{args.split.replace(',', '-')}.json")
        print(contamination_line(data_path, args.split, cached), flush=True)
    evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
    num_samples = (train_samples, max(1, evals) * args.eval_iters * gbs, None)
    # collective: Megatron's builder lets rank 0 build the index caches first
    # Every rank reads its own samples (no TP broadcast), so every rank builds.
    train, valid, _ = build_gpt_datasets(data_path, args.split, args.seq_length, args.seed, tokenizer, num_samples,
                                         cache, is_built_on_rank=lambda: True, eod_mask_loss=args.eod_mask_loss,
                                         reset_position_ids=args.reset_position_ids,
                                         reset_attention_mask=args.reset_attention_mask,
                                         create_attention_mask=args.reset_attention_mask)
    return train, (valid if args.eval_interval else None), tokenizer


def _on_rank0_first(fn):
    """Run ``fn`` on rank 0, then on the others: caches are built once."""
    if dist.get_rank() == 0:
        out = fn()
        dist.barrier()
    else:
        dist.barrier()
        out = fn()
    return out
