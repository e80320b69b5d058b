"""Configuration dataclasses for the two regularizers.

They are plain dataclasses so that the trainer, the Megatron patch and user
code can build them from flags, YAML or Python alike. Every field is checked
in ``__post_init__`` so a bad value fails where it is written, not deep inside
a training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SIMREG_IMPLS = ("auto", "naive", "blockwise", "triton")
SIMREG_REPRESENTATIONS = ("post_norm", "pre_norm")
SIMREG_MODES = ("exact", "shard_local")
SIMREG_NORMALIZATIONS = ("global_batch", "micro_batch")
SIMREG_SCOPES = ("sequence", "document")
JREG_WEIGHTINGS = ("final", "layer_weighted")
JREG_METRICS = ("angular", "cosine")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_temperature(temperature) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be None or an int > 0, got {chunk_size!r}")


def check_scope(scope, eod_id) -> None:
    check_choice("scope", scope, SIMREG_SCOPES)
    if scope == "document" and (isinstance(eod_id, bool) or not isinstance(eod_id, int) or eod_id < 0):
        raise ValueError(f'scope="document" needs eod_id, the tokenizer\'s end-of-document id (an int >= 0), '
                         f"got {eod_id!r}")


def check_weight(name: str, weight) -> None:
    if not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {weight!r}")


@dataclass
class SimRegConfig:
    """SimReg settings. The training objective is ``L = L_LM + weight * L_SimReg``.

    Attributes:
        weight: lambda, the SimReg coefficient (>= 0; 0 disables the term but
            still computes and logs it). 0.1 is our default, not a value from
            the paper, which does not publish one for every scale.
        temperature: tau in ``exp(z_i . z_j / tau)``.
        chunk_size: when set, anchors only see keys in the same window of
            ``chunk_size`` consecutive positions (the paper's SimReg-Chunk).
        representation: ``"post_norm"`` (default) regularizes the states the
            LM head classifies, i.e. after the final norm; ``"pre_norm"`` the
            last layer's output before it.
        impl: ``"auto" | "naive" | "blockwise" | "triton"``, see :func:`simreg_loss`.
        mode: how the loss is split under tensor/sequence/context parallelism
            (the Megatron integration): ``"exact"`` reproduces the
            single-process loss, ``"shard_local"`` treats each rank's shard as
            its own chunk.
        normalization: how the Megatron integration scales the gradient over
            micro-batches and data-parallel ranks. ``"global_batch"`` (exact:
            the anchor-weighted mean over the whole global batch, as for one
            large batch) needs the step's anchor count from
            ``megatron_simreg.megatron.begin_step``; ``"micro_batch"`` needs
            nothing and averages per-micro-batch means, like Megatron's MoE
            aux loss. See ``megatron_simreg/megatron/step.py``.
        scope: ``"sequence"`` (default) pairs any two tokens of a training
            sequence; ``"document"`` only tokens of the same document of a
            packed sequence, documents ending after each input EOD token
            (Megatron's ``--reset-attention-mask`` boundaries; see
            :func:`megatron_simreg.losses.simreg.document_ids`).
        eod_id: the tokenizer's end-of-document id; required by
            ``scope="document"``.
    """

    weight: float = 0.1
    temperature: float = 0.1
    chunk_size: Optional[int] = None
    representation: str = "post_norm"
    impl: str = "auto"
    mode: str = "exact"
    normalization: str = "global_batch"
    scope: str = "sequence"
    eod_id: Optional[int] = None

    def __post_init__(self):
        check_weight("SimRegConfig.weight", self.weight)
        check_temperature(self.temperature)
        check_chunk_size(self.chunk_size)
        check_choice("SimRegConfig.representation", self.representation, SIMREG_REPRESENTATIONS)
        check_choice("SimRegConfig.impl", self.impl, SIMREG_IMPLS)
        check_choice("SimRegConfig.mode", self.mode, SIMREG_MODES)
        check_choice("SimRegConfig.normalization", self.normalization, SIMREG_NORMALIZATIONS)
        check_scope(self.scope, self.eod_id)


@dataclass
class JRegConfig:
    """JREG settings. The training objective is ``L = L_LM + weight * R``.

    Attributes:
        weight: alpha. 3.0 is the best value in the JREG paper's ablation.
        weighting: ``"final"`` penalizes only the last layer's distance;
            ``"layer_weighted"`` uses ``w_l ∝ (l/L)^power`` over all layers.
        power: p for ``"layer_weighted"``.
        metric: ``"angular"`` (``arccos(cos)/pi``) or ``"cosine"``
            (``(1 - cos)/2``); both map orthogonal states to 0.5.
    """

    weight: float = 3.0
    weighting: str = "final"
    power: float = 1.0
    metric: str = "angular"

    def __post_init__(self):
        check_weight("JRegConfig.weight", self.weight)
        check_choice("JRegConfig.weighting", self.weighting, JREG_WEIGHTINGS)
        check_choice("JRegConfig.metric", self.metric, JREG_METRICS)
        if not isinstance(self.power, (int, float)) or self.power < 0:
            raise ValueError(f"JRegConfig.power must be a float >= 0, got {self.power!r}")
