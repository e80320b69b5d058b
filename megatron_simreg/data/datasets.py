"""Train/valid/test GPT datasets from indexed data with megatron-core's ``BlendedMegatronDatasetBuilder``.

Each sample is a dict of ``torch.int64`` / ``float32`` tensors, all ``[seq_length]``:

- ``tokens``: input ids; ``labels``: the next token of each position (``labels[i] == tokens[i + 1]``; each
  sample reads ``seq_length + 1`` consecutive tokens of the concatenated, shuffled documents);
- ``loss_mask``: 1.0 where the label counts (0 only on padding, or on ``eod`` labels with ``eod_mask_loss``);
- ``position_ids``: ``0 .. seq_length - 1`` (restarting after each ``eod`` with ``reset_position_ids``);
- blends of several datasets add ``dataset_id`` (which blend member the sample came from).

The order is Megatron's: documents shuffled per epoch, then samples shuffled, all from ``numpy``
``RandomState(seed)``; the same seed and inputs give the same samples in the same order on every run.

Process groups: the builder works with or without ``torch.distributed``. Initialized, rank 0 builds (and
caches) the indices first, the others wait at a barrier and then load them; ranks for which
``is_built_on_rank()`` is False get ``None`` (default: Megatron-LM's rule, first or last pipeline stage and
tensor-parallel rank 0, as in ``pretrain_gpt.py``; every rank when Megatron's model parallel state is not
set up). All ranks must call :func:`build_gpt_datasets`; ``cache_dir`` must then be shared by all ranks.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def default_is_built_on_rank() -> bool:
    """Megatron-LM's ``is_dataset_built_on_rank``: first/last pipeline stage and TP rank 0 build datasets."""
    if not torch.distributed.is_initialized():
        return True
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    first_or_last = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(ignore_virtual=True)
    return first_or_last and ps.get_tensor_model_parallel_rank() == 0


class MegatronTokenizerAdapter:
    """The few attributes Megatron's GPT datasets read (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``)
    for any tokenizer that has ``vocab_size`` and ``eod``, or a Hugging Face one (``eos_token_id``, ``len``).

    ``unique_identifiers`` goes into Megatron's cache names; ``pad`` -1 means "no pad token" to Megatron.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if hasattr(tokenizer, "eod"):
            self.eod, self.vocab_size = int(tokenizer.eod), int(tokenizer.vocab_size)
        elif getattr(tokenizer, "eos_token_id", None) is not None:  # transformers
            self.eod, self.vocab_size = int(tokenizer.eos_token_id), len(tokenizer)
        else:
            raise TypeError(f"{type(tokenizer).__name__} has neither `eod` nor `eos_token_id`; Megatron's GPT "
                            f"dataset needs the end-of-document id. Fix: pass megatron_simreg.data.Tokenizer.")
        pad = getattr(tokenizer, "pad", getattr(tokenizer, "pad_token_id", None))
        self.pad = -1 if pad is None else int(pad)
        self.unique_identifiers = getattr(tokenizer, "unique_identifiers", None) or {
            "class": type(tokenizer).__name__,
            "name": str(getattr(tokenizer, "name_or_path", getattr(tokenizer, "model_path", ""))),
            "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> List[int]:
        return list(self.tokenizer.tokenize(text) if hasattr(self.tokenizer, "eod") else self.tokenizer.encode(text))

    def detokenize(self, ids) -> str:
        return (self.tokenizer.detokenize if hasattr(self.tokenizer, "eod") else self.tokenizer.decode)(list(ids))


def as_megatron_tokenizer(tokenizer):
    """``tokenizer`` itself when it already has what Megatron reads, else a :class:`MegatronTokenizerAdapter`."""
    if all(hasattr(tokenizer, a) for a in ("eod", "vocab_size", "pad", "unique_identifiers")):
        return tokenizer
    return MegatronTokenizerAdapter(tokenizer)


def parse_blend(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's ``--data-path`` list -> ``(prefixes, weights or None)``, checked.

    ``["prefix"]``, ``["prefixA", "prefixB"]`` (weights from the dataset sizes) or
    ``["0.3", "prefixA", "0.7", "prefixB"]`` (weights need not sum to 1).
    """
    from megatron.core.datasets.utils import get_blend_from_list

    if isinstance(data_path, str):
        data_path = data_path.split()
    data_path = [str(p) for p in data_path]
    if not data_path:
        raise ValueError("data_path is empty. Fix: pass a dataset prefix, e.g. ['out_text_document'], or a "
                         "weighted blend ['0.3', 'prefixA', '0.7', 'prefixB'].")
    prefixes, weights = get_blend_from_list(data_path)
    if weights is not None and any(w <= 0 for w in weights):
        raise ValueError(f"blend weights must be > 0, got {weights} from {data_path}")
    return list(prefixes), weights


def check_prefix(prefix: str) -> None:
    """Raise ``FileNotFoundError`` naming the prefix and the fix unless ``prefix.bin`` and ``prefix.idx`` exist."""
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if not missing:
        return
    hint = ""
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx") and os.path.isfile(stem + ".bin") and os.path.isfile(stem + ".idx"):
        hint = f" Pass the prefix without the extension: {stem!r}."
    raise FileNotFoundError(
        f"dataset {prefix!r} not found: missing {', '.join(missing)}.{hint} Fix: create it with "
        f"`python tools/preprocess_data.py --input DOCS.jsonl --output-prefix OUT --tokenizer-model TOK.model "
        f"--append-eod` and pass OUT_text_document (the prefix, without .bin/.idx).")


def max_token_id(prefix: str, budget: int = 1 << 25, windows: int = 256) -> int:
    """The largest token id in ``prefix.bin`` (-1 when empty), or, past ``budget`` tokens, in ``windows`` evenly
    spaced windows of ``budget`` tokens in all: every rank runs this at start-up, so a multi-TB corpus must not be
    read whole; data from a larger tokenizer uses its high ids throughout, so a spread sample finds them.

    The dtype comes from the ``.idx`` header (Megatron's layout: 9-byte magic, 8-byte version, 1-byte dtype code).
    """
    import struct

    import numpy
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    with open(prefix + ".idx", "rb") as f:
        if f.read(9) != _INDEX_HEADER:
            raise ValueError(f"{prefix}.idx is not a Megatron indexed-dataset index (bad header). Fix: re-create it "
                             f"with tools/preprocess_data.py")
        f.read(8)
        dtype = DType.dtype_from_code(struct.unpack("<B", f.read(1))[0])
    if os.path.getsize(prefix + ".bin") == 0:
        return -1
    data = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    if len(data) <= budget:
        spans = [(start, start + budget) for start in range(0, len(data), budget)]
    else:
        width, stride = budget // windows, len(data) // windows
        spans = [(i * stride, i * stride + width) for i in range(windows)]
    top = max(int(data[a:b].max()) for a, b in spans)
    del data
    return top


def check_token_range(data_path: Sequence[str], tokenizer, tokenizer_type: str = "SentencePieceTokenizer") -> None:
    """Raise ``ValueError`` when a dataset of ``data_path`` holds a token id >= ``tokenizer.vocab_size``.

    Such data was tokenized with another (larger) tokenizer: its ids mean other tokens, or none, for this one.
    Reads each ``.bin``, or a bounded sample of a large one (:func:`max_token_id`).
    """
    prefixes, _ = parse_blend(data_path)
    vocab = int(tokenizer.vocab_size)
    for prefix in prefixes:
        check_prefix(prefix)
        top = max_token_id(prefix)
        if top >= vocab:
            raise ValueError(
                f"dataset {prefix!r} holds token id {top}, but the tokenizer {getattr(tokenizer, 'model_path', '?')} "
                f"({tokenizer_type}) has only {vocab} tokens: the data was tokenized with another tokenizer. Fix: "
                f"re-run tools/preprocess_data.py with this --tokenizer-type/--tokenizer-model, or pass the "
                f"tokenizer the data was made with")


def _data_fingerprint(prefixes: Sequence[str]) -> str:
    """Sizes of each ``.bin``/``.idx`` and a hash of the ``.idx`` head: changes when a dataset is re-made.

    Megatron names its cached indices by the dataset *path*, not its contents, so re-preprocessing a prefix
    in place would reuse indices of the old data. Cached indices therefore go in a subfolder of ``cache_dir``
    named by this fingerprint. Contents (not mtimes) make it equal on every node holding a copy.
    """
    h = hashlib.md5(usedforsecurity=False)
    for prefix in prefixes:
        h.update(os.path.abspath(prefix).encode())
        for ext in (".bin", ".idx"):
            path = prefix + ext
            h.update(str(os.path.getsize(path) if os.path.exists(path) else -1).encode())
        if os.path.exists(prefix + ".idx"):
            with open(prefix + ".idx", "rb") as f:
                h.update(f.read(1 << 22))
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _builder_class():
    """Megatron's builder, with BlendedDataset swapped for :func:`_single_process_blended` without a process group."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    single_process_blended = _single_process_blended(BlendedDataset)

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                cls = single_process_blended
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks,
                                                                       *args)

    return Builder


def _single_process_blended(BlendedDataset):
    """``BlendedDataset`` that builds its index cache without ``torch.distributed``.

    megatron-core 0.16's ``BlendedDataset._build_indices`` calls ``torch.distributed.get_rank()`` on a cache
    miss, which raises without a process group. On a miss this subclass builds the indices with the cache
    switched off, then writes the cache files itself (temporary name + rename), under the names Megatron
    would use (the class keeps the name ``BlendedDataset``, which enters the cache hash), so single-process
    and distributed runs share cache entries.
    """
    import numpy

    class SingleProcessBlendedDataset(BlendedDataset):
        def _build_indices(self):
            cache = self.config.path_to_cache
            base = f"{self.unique_description_hash}-BlendedDataset-{self.split.name}-"
            paths = [os.path.join(cache or "", base + s)
                     for s in ("description.txt", "dataset_index.npy", "dataset_sample_index.npy")]
            if not cache or all(map(os.path.isfile, paths)):
                return super()._build_indices()  # neither path asks for the rank
            config, self.config = self.config, copy.copy(self.config)
            self.config.path_to_cache = None
            log = logging.getLogger(BlendedDataset.__module__)  # silence "cannot save ... path_to_cache is None"
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                indices = super()._build_indices()
            finally:
                self.config = config
                log.setLevel(level)
            os.makedirs(cache, exist_ok=True)
            for path, content in zip(paths, (self.unique_description, *indices)):
                tmp = f"{path}.tmp{os.getpid()}"
                if isinstance(content, str):
                    with open(tmp, "w") as f:
                        f.write(content)
                else:
                    with open(tmp, "wb") as f:
                        numpy.save(f, content, allow_pickle=True)
                os.replace(tmp, path)
            return indices

    SingleProcessBlendedDataset.__name__ = SingleProcessBlendedDataset.__qualname__ = "BlendedDataset"
    return SingleProcessBlendedDataset


def build_gpt_datasets(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer,
    num_samples: Tuple[Optional[int], Optional[int], Optional[int]],
    cache_dir: Optional[str] = None,
    *,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = False,
):
    """Build ``(train, valid, test)`` GPT datasets (Megatron's ``GPTDataset``, or ``BlendedDataset`` for blends).

    - ``data_path``: Megatron's ``--data-path`` list (see :func:`parse_blend`); each entry a prefix of
      ``.bin``/``.idx`` files from ``tools/preprocess_data.py``. ``None``: megatron-core's mock GPT dataset
      (``MockGPTDataset``, Megatron-LM's ``--mock-data``: synthetic documents, no files).
    - ``split``: Megatron's ``"train,valid,test"`` weights of the documents, e.g. ``"98,2,0"``.
    - ``num_samples``: samples wanted per split (Megatron's ``train_val_test_num_samples``); a dataset spans
      as many epochs as that takes. ``None`` = one epoch (not allowed with explicit blend weights).
    - ``tokenizer``: :class:`~megatron_simreg.data.tokenizer.Tokenizer` or anything
      :func:`as_megatron_tokenizer` accepts; only ``eod``/``pad``/``vocab_size`` are read.
    - ``cache_dir``: where Megatron caches the index arrays (see :func:`_data_fingerprint`); ``None`` keeps
      Megatron's default, ``{prefix}/cache/GPTDataset_indices`` next to each dataset.

    A split whose weight is 0 gives ``None``, as does every split on a rank where ``is_built_on_rank()`` is
    False. ``create_attention_mask=False`` (the model builds the causal mask) gives the four keys of the
    module docstring; True adds Megatron's ``attention_mask`` ``[1, s, s]``.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    from .helpers import ensure_dataset_helpers

    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    is_built_on_rank = is_built_on_rank or default_is_built_on_rank
    mock = data_path is None
    prefixes, weights = ([], None) if mock else parse_blend(data_path)
    builds_here = not torch.distributed.is_initialized() or is_built_on_rank()
    if builds_here:
        for prefix in prefixes:
            check_prefix(prefix)
        ensure_dataset_helpers()
    path_to_cache = None if cache_dir is None or mock else os.path.join(cache_dir, _data_fingerprint(prefixes))

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None if mock else (prefixes, weights),
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=as_megatron_tokenizer(tokenizer),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    sizes = list(num_samples)
    if weights is not None:
        for i, (name, size, bounds) in enumerate(zip(("train", "valid", "test"), sizes, config.split_matrix)):
            if bounds is None:  # an empty split: Megatron still asserts "no size => no weights" for it
                sizes[i] = 0
            elif size is None:
                raise ValueError(f"a weighted blend needs a sample count for every split it builds; the {name} "
                                 f"split has weight > 0 in {split!r} but num_samples gives None. Fix: pass a "
                                 f"number, or drop the weights from data_path.")
    cls = MockGPTDataset if mock else GPTDataset
    train, valid, test = _builder_class()(cls, sizes, is_built_on_rank, config).build()
    return train, valid, test
