"""Layer-jump and representation probes for any local Hugging Face causal LM.

The states follow :mod:`megatron_simreg.losses.jreg`: ``h_0`` is the input of
the first decoder layer (the embeddings), ``h_l`` the output of decoder layer
``l`` (``l = 1..L``), all *before* the final norm, each ``[b, s, h]``. They are
captured with hooks on the decoder layers instead of ``output_hidden_states``,
whose last entry is normed in some models/versions and not in others.

``final`` ``[b, s, h]`` is what the LM head sees (after the final norm): the
representation SimReg's label statistics and the classification margins are
about.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch

from ..losses.jreg import jump_strength, layer_distance_sums
from .representations import classification_margins, label_cosine_similarity

# Fixed margin histogram edges (logit units) so that runs and models are
# comparable. ``counts`` has ``len(edges) + 1`` bins: ``counts[0]`` holds
# margins ``< edges[0]``, ``counts[i]`` those in ``[edges[i-1], edges[i])``
# and ``counts[-1]`` those ``>= edges[-1]``.
MARGIN_EDGES = (-20.0, -10.0, -5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


class ProbeError(ValueError):
    """A model, tokenizer or input the probe cannot use; the message says why and what to pass instead."""


# --------------------------------------------------------------------------- loading


def weights_error(path: str, e: BaseException) -> Optional[str]:
    """One line saying why ``from_pretrained(path)`` could not read the weights, and the fix; ``None`` when ``e``
    is not a weight-file problem."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    index = os.path.join(path, "model.safetensors.index.json")
    if type(e).__name__ == "SafetensorError":  # safetensors' Rust error: a truncated or non-safetensors file
        which = "a shard listed in model.safetensors.index.json" if os.path.isfile(index) else \
            os.path.join(path, "model.safetensors")
        return (f"cannot read the weights in {which} ({first}): the file is truncated or not a safetensors file; "
                "copy or download it again")
    if isinstance(e, FileNotFoundError) and os.path.isfile(index):
        missing = os.path.basename(e.filename or first.rsplit(" ", 1)[-1])
        return (f"{index} lists the shard {missing}, which is not in {path}: copy every shard the index names "
                "(the download is incomplete)")
    if isinstance(e, OSError) and not any(
            os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json",
                                                            "pytorch_model.bin", "pytorch_model.bin.index.json")):
        return (f"{path} has a config.json but no weights (model.safetensors, model.safetensors.index.json or "
                "pytorch_model.bin): copy the model's weight files into it")
    if isinstance(e, OSError):
        return f"could not load the weights in {path}: {first}"
    return None


def load_causal_lm(path: str, device: str = "cpu", dtype: str = "float32"):
    """``(model, tokenizer or None)`` from a local Hugging Face directory, model in eval mode on ``device``.

    ``dtype``: ``float32`` / ``bfloat16`` / ``float16`` (or ``fp32`` / ``bf16`` / ``fp16``). The tokenizer
    is ``None`` when the directory holds no tokenizer files; a tokenizer that is present but fails to load
    raises.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if dtype not in DTYPES:
        raise ProbeError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if not os.path.isdir(path):
        raise ProbeError(f"model directory not found: {path!r} does not exist. Pass a local Hugging Face model directory "
                         "(with config.json and weights), e.g. the output of `megatron-simreg export-hf`.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ProbeError(f"{path!r} has no config.json, so it is not a Hugging Face model directory "
                         f"(it holds: {sorted(os.listdir(path))[:10]}).")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as e:
        raise ProbeError(f"{path}/config.json could not be read by transformers: {e}") from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ProbeError(f"{path!r} is a {config.model_type!r} model ({getattr(config, 'architectures', None)}), "
                         "which transformers has no causal-LM class for; pass a decoder-only causal LM "
                         "(Llama, Mistral, Qwen2, Mixtral, GPT-2, GPT-NeoX, ...).")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError is no OSError
        why = weights_error(path, e)
        if why is None and not isinstance(e, ValueError):
            raise
        raise ProbeError(why or f"could not load {path!r} as a causal LM: {e}") from e
    model.to(device).eval()
    tokenizer = None
    if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model) -> int:
    """``L``, the number of decoder layers the config declares (``num_hidden_layers`` / ``n_layer`` / ...)."""
    config = _text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ProbeError(f"{type(config).__name__} declares no layer count (num_hidden_layers / n_layer)")


def max_positions(model) -> Optional[int]:
    """The longest sequence the model's position embeddings allow, or ``None`` when the config says nothing."""
    config = _text_config(model)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ``nn.ModuleList`` of the ``L`` decoder layers (``model.model.layers``, ``transformer.h``, ...).

    Found generically: the first ModuleList (in module order, so the decoder stack comes before any
    per-layer expert list) whose length is the config's layer count. Raises :class:`ProbeError` when
    none matches.
    """
    n = num_layers(model)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and \
                all(any(True for _ in layer.parameters()) for layer in module):
            return module
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    raise ProbeError(f"{type(model).__name__}: no nn.ModuleList of {n} decoder layers found "
                     f"(ModuleLists present: {lists[:8]})")


# --------------------------------------------------------------------------- probing


@dataclass
class Probe:
    """One forward pass's representations.

    ``states``: ``[h_0, h_1, ..., h_L]``, each ``[b, s, h]`` (before the final norm); ``final``
    ``[b, s, h]``: the LM head's input (after the final norm); ``logits`` ``[b, s, V]``.
    """

    states: List[torch.Tensor]
    final: torch.Tensor
    logits: torch.Tensor


def _first(x):
    # Decoder layers return a tensor (transformers 5) or a tuple (hidden_states, attn weights, cache...).
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def probe(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> Probe:
    """Run ``model`` on ``input_ids`` ``[b, s]`` and capture :class:`Probe` (states, final, logits).

    Hooks: a forward pre-hook on layer 0 (``h_0``, positional or keyword ``hidden_states``), a forward hook on
    every layer (``h_l``) and a forward pre-hook on ``model.get_output_embeddings()`` (``final``). They are
    removed on exit, also on error. Each layer must run exactly once (no layer skipping or reuse).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ProbeError(f"input_ids must be a [b, s] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    layers = decoder_layers(model)
    head = model.get_output_embeddings()
    if head is None:
        raise ProbeError(f"{type(model).__name__} has no output embeddings (LM head) to capture the final state at")
    inputs: list = []
    outputs: List[list] = [[] for _ in layers]
    finals: list = []

    def grab_input(module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(h, torch.Tensor):
            raise ProbeError(f"{type(module).__name__} was called without a hidden_states tensor "
                             "(neither positional nor keyword)")
        # Clone: a later layer might update its input in place.
        inputs.append(h.detach().clone())

    def grab_output(index):
        def hook(module, args, output):
            outputs[index].append(_first(output).detach().clone())
        return hook

    def grab_final(module, args, kwargs):
        h = args[0] if args else kwargs.get("input")
        finals.append(h.detach().clone())

    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    handles = []
    try:
        handles.append(layers[0].register_forward_pre_hook(grab_input, with_kwargs=True))
        handles.append(head.register_forward_pre_hook(grab_final, with_kwargs=True))
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(grab_output(i)))
        out = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    calls = [len(o) for o in outputs]
    if len(inputs) != 1 or calls != [1] * len(layers) or len(finals) != 1:
        raise ProbeError(f"expected every decoder layer and the LM head to run once, got layer-0 inputs "
                         f"{len(inputs)}, layer outputs {calls}, LM-head calls {len(finals)}")
    states = inputs + [o[0] for o in outputs]
    shape = states[0].shape
    if any(s.shape != shape for s in states) or finals[0].shape != shape:
        raise ProbeError(f"captured states differ in shape: {[tuple(s.shape) for s in states]}, final "
                         f"{tuple(finals[0].shape)}")
    return Probe(states=states, final=finals[0], logits=out.logits)


# --------------------------------------------------------------------------- analysis


def next_token_labels(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``[b, s]``: ``labels[:, t] = input_ids[:, t + 1]``, the last position ``ignore_index``."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def label_pair_counts(labels: torch.Tensor, ignore_index: int = -100):
    """``(intra, inter)`` pair counts for one sequence's ``labels`` ``[s]``, as in ``label_cosine_similarity``.

    Ordered pairs of distinct valid positions: ``intra`` share the label, ``inter`` do not.
    """
    valid = labels[labels != ignore_index]
    n = valid.numel()
    counts = torch.unique(valid, return_counts=True)[1].long()
    intra = int((counts * (counts - 1)).sum())
    return intra, n * (n - 1) - intra


def _chunks(input_ids, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ProbeError(f"input_ids must be [n, s], got {tuple(input_ids.shape)}")
        yield from input_ids.split(batch_size)
    else:  # an iterable of [b, s] batches
        yield from input_ids


def _nan_to_none(x: float) -> Optional[float]:
    return None if x is None or math.isnan(x) or math.isinf(x) else x


def margin_summary(margins: torch.Tensor, edges: Sequence[float] = MARGIN_EDGES) -> dict:
    """``margin_mean``, ``margin_median``, ``margin_frac_positive`` and ``margin_hist`` of 1-D ``margins``."""
    m = margins.double()
    bounds = torch.tensor(edges, dtype=torch.float64)
    # right=True: bin i holds edges[i-1] <= m < edges[i] (see MARGIN_EDGES).
    counts = torch.bincount(torch.bucketize(m, bounds, right=True), minlength=len(edges) + 1)
    empty = m.numel() == 0
    return {
        "margin_mean": None if empty else m.mean().item(),
        "margin_median": None if empty else m.median().item(),
        "margin_frac_positive": None if empty else (m > 0).double().mean().item(),
        "margin_hist": {"edges": list(edges), "counts": [int(c) for c in counts]},
    }


def analyze(model, input_ids: Union[torch.Tensor, Iterable[torch.Tensor]], *, batch_size: int = 1,
            include_margins: bool = False, metric: str = "angular") -> dict:
    """Jump and representation statistics over ``input_ids`` ``[n, s]`` (or an iterable of ``[b, s]`` batches).

    The sequences run ``batch_size`` at a time (memory stays bounded) and the results are aggregated exactly:
    distances weighted by tokens, cosines by pairs, margins pooled. Returns plain Python values:

    - ``layers``: ``L``; ``layer_distances``: ``[d_1 .. d_L]``, the mean angular distance between consecutive
      states over all tokens (``jreg.layer_angular_distances``);
    - ``jump_strength``: ``d_L / mean(d_1 .. d_{L-1})`` (``None`` when ``L < 2``);
    - ``intra_cos`` / ``inter_cos``: mean cosine of the ``final`` states of token pairs (same sequence, distinct
      positions) with the same / a different next-token label (``None`` when no such pair);
    - ``margin_mean``, ``margin_median``, ``margin_frac_positive``, ``margin_hist`` (``{"edges", "counts"}``,
      :data:`MARGIN_EDGES`): true next-token logit minus the best other logit; ``margins`` (the raw list) only
      with ``include_margins``;
    - ``tokens``: tokens the distances average over (``n * s``); ``labelled_tokens``: ``n * (s - 1)``, those
      with a next-token label (cosines, margins); ``sequences``: ``n``.
    """
    if batch_size < 1:
        raise ProbeError(f"batch_size must be >= 1, got {batch_size}")
    dist_sums, tokens, sequences = None, 0, 0
    intra_sum = inter_sum = 0.0
    intra_n = inter_n = 0
    margins = []
    for ids in _chunks(input_ids, batch_size):
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ProbeError(f"each batch must be [b, s] with s >= 2 (next-token labels), got {tuple(ids.shape)}")
        p = probe(model, ids)
        sums, count = layer_distance_sums([s.float() for s in p.states], metric=metric)
        dist_sums = sums.double() if dist_sums is None else dist_sums + sums.double()
        tokens += int(count)
        sequences += ids.shape[0]
        labels = next_token_labels(ids.to(p.final.device))
        for b in range(ids.shape[0]):  # one sequence at a time: the [s, s] cosine matrix stays small
            n_intra, n_inter = label_pair_counts(labels[b])
            intra, inter = label_cosine_similarity(p.final[b:b + 1], labels[b:b + 1])
            if n_intra:
                intra_sum += intra * n_intra
                intra_n += n_intra
            if n_inter:
                inter_sum += inter * n_inter
                inter_n += n_inter
        margins.append(classification_margins(p.logits, labels).double().cpu())
    if dist_sums is None:
        raise ProbeError("analyze got no sequences")
    d = dist_sums / tokens
    all_margins = torch.cat(margins)
    result = {
        "layers": d.numel(),
        "layer_distances": d.tolist(),
        "jump_strength": jump_strength(d).item() if d.numel() >= 2 else None,
        "intra_cos": intra_sum / intra_n if intra_n else None,
        "inter_cos": inter_sum / inter_n if inter_n else None,
        **margin_summary(all_margins),
        "tokens": tokens,
        "labelled_tokens": all_margins.numel(),
        "sequences": sequences,
    }
    if include_margins:
        result["margins"] = all_margins.tolist()
    return {k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in result.items()}


# --------------------------------------------------------------------------- text


def text_to_sequences(text: str, tokenizer, seq_length: int, max_sequences: Optional[int] = None) -> torch.Tensor:
    """LongTensor ``[n, seq_length]``: ``text``'s token ids (no special tokens) packed, the tail dropped.

    ``n = min(len(ids) // seq_length, max_sequences)``. Raises :class:`ProbeError` when the text has fewer
    than ``seq_length`` tokens.
    """
    if seq_length < 2:
        raise ProbeError(f"seq_length must be >= 2, got {seq_length}")
    if max_sequences is not None and max_sequences < 1:
        raise ProbeError(f"max_sequences must be >= 1, got {max_sequences}")
    # verbose=False: a long text is meant to exceed model_max_length here; it is cut into sequences below.
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    n = len(ids) // seq_length
    if n == 0:
        raise ProbeError(f"the text has {len(ids)} tokens, fewer than one sequence of --seq-length {seq_length} "
                         f"needs; pass a longer text or --seq-length {max(2, len(ids))} or less")
    if max_sequences is not None:
        n = min(n, max_sequences)
    return torch.tensor(ids[: n * seq_length], dtype=torch.long).view(n, seq_length)
