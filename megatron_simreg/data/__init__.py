"""The pretraining data layer: tokenizer, JSONL preprocessing, Megatron GPT datasets, the default corpus.

- :mod:`.tokenizer`: ``train_sentencepiece`` (deterministic, byte fallback) and ``Tokenizer``;
  ``HFTokenizer`` (a local Hugging Face tokenizer directory) and ``build_tokenizer(tokenizer_type, model)``
  (Megatron-LM's ``--tokenizer-type`` names); ``check_vocab_fits`` for the model's vocabulary.
- :mod:`.preprocess`: ``preprocess_jsonl`` writes Megatron indexed datasets
  (``{output_prefix}_{key}_document.bin/.idx``), as Megatron-LM's ``preprocess_data.py``.
- :mod:`.datasets`: ``build_gpt_datasets`` -> (train, valid, test) through megatron-core's
  ``BlendedMegatronDatasetBuilder``, with or without ``torch.distributed``; ``check_token_range`` refuses data
  whose token ids exceed the tokenizer's vocabulary.
- :mod:`.default_corpus`: ``prepare_default_corpus``, the stdlib's Python source, cached by content hash.
- :mod:`.helpers`: ``ensure_dataset_helpers`` compiles megatron-core's C++ index helpers if a source
  install lacks them.

megatron-core is imported only inside the functions that need it.
"""

from .datasets import as_megatron_tokenizer, build_gpt_datasets, check_prefix, check_token_range, parse_blend
from .default_corpus import prepare_default_corpus, stdlib_documents
from .helpers import ensure_dataset_helpers
from .preprocess import document_prefix, preprocess_jsonl
from .tokenizer import HFTokenizer, Tokenizer, build_tokenizer, check_vocab_fits, train_sentencepiece

__all__ = [
    "Tokenizer", "HFTokenizer", "build_tokenizer", "check_vocab_fits", "train_sentencepiece",
    "document_prefix", "preprocess_jsonl",
    "as_megatron_tokenizer", "build_gpt_datasets", "check_prefix", "check_token_range", "parse_blend",
    "prepare_default_corpus", "stdlib_documents",
    "ensure_dataset_helpers",
]
