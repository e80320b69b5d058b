"""The pretraining data layer: tokenizer, JSONL preprocessing, Megatron GPT datasets, the default corpus.

- :mod:`.tokenizer`: ``train_sentencepiece`` (deterministic, byte fallback) and ``Tokenizer``;
  ``check_vocab_fits`` for the model's vocabulary.
- :mod:`.preprocess`: ``preprocess_jsonl`` writes Megatron indexed datasets
  (``{output_prefix}_{key}_document.bin/.idx``), as Megatron-LM's ``preprocess_data.py``.
- :mod:`.datasets`: ``build_gpt_datasets`` -> (train, valid, test) through megatron-core's
  ``BlendedMegatronDatasetBuilder``, with or without ``torch.distributed``.
- :mod:`.default_corpus`: ``prepare_default_corpus``, the stdlib's Python source, cached by content hash.
- :mod:`.helpers`: ``ensure_dataset_helpers`` compiles megatron-core's C++ index helpers if a source
  install lacks them.

megatron-core is imported only inside the functions that need it.
"""

from .datasets import as_megatron_tokenizer, build_gpt_datasets, check_prefix, parse_blend
from .default_corpus import prepare_default_corpus, stdlib_documents
from .helpers import ensure_dataset_helpers
from .preprocess import document_prefix, preprocess_jsonl
from .tokenizer import Tokenizer, check_vocab_fits, train_sentencepiece

__all__ = [
    "Tokenizer", "check_vocab_fits", "train_sentencepiece",
    "document_prefix", "preprocess_jsonl",
    "as_megatron_tokenizer", "build_gpt_datasets", "check_prefix", "parse_blend",
    "prepare_default_corpus", "stdlib_documents",
    "ensure_dataset_helpers",
]
