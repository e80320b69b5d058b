"""``megatron-simreg train`` flags: Megatron-LM's names, plus ``--config file.yaml``.

Precedence: built-in defaults < YAML file < command-line flags. YAML keys are
the flag names with dashes or underscores (``num-layers`` or ``num_layers``).
Every cross-flag rule is checked in :func:`validate`, so a bad combination
fails before any process group or model is created.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

import yaml

from ..config import JREG_WEIGHTINGS, SIMREG_MODES, SIMREG_SCOPES
from ..data.tokenizer import SENTENCEPIECE, TOKENIZER_TYPES
from .resume_checks import RESUMABLE_CHANGES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of flags; command-line flags override it")
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden (8/3 * hidden with --swiglu)")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=128,
                   help="training sequence length (a resume may change it; at most --max-position-embeddings with "
                        "learned_absolute positions)")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="the model's position limit (default --seq-length): the size of the learned_absolute "
                        "position table; with rope it is only recorded (HF's max_position_embeddings)")
    g.add_argument("--normalization", default="RMSNorm", choices=["RMSNorm", "LayerNorm"])
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--position-embedding-type", default="rope", choices=["rope", "learned_absolute"])
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base (HF's rope_theta)")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="RMSNorm/LayerNorm epsilon (HF's rms_norm_eps)")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x's RoPE scaling (HF rope_type 'llama3', low/high freq factors 1/4, original "
                        "context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="with --use-rope-scaling (HF's factor)")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="the head dimension (HF's head_dim); default --hidden-size / --num-attention-heads")
    g.add_argument("--add-qkv-bias", action="store_true", help="biases on the q/k/v projections only (Qwen2)")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalize each head's queries and keys before RoPE (Qwen3's q_norm/k_norm)")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="std of the initial weights (HF's initializer_range); no effect when weights are loaded")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g = p.add_argument_group("batching and schedule")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro-batch-size * data-parallel size")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over the global batch's tokens (Megatron backend), not per micro-batch")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="start this many local processes (only when not already launched: RANK unset)")
    g = p.add_argument_group("activation recompute (Megatron-LM's flags)")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"],
                   help="full: recompute whole layers in backward; selective: core attention only")
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"],
                   help="with full: checkpoint chunks of --recompute-num-layers layers (uniform), or only the first "
                        "--recompute-num-layers layers of each pipeline stage (block)")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g = p.add_argument_group("backend")
    g.add_argument("--deepspeed", action="store_true", help="DeepSpeed engine instead of Megatron DDP")
    g.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2])
    g.add_argument("--use-distributed-optimizer", action="store_true", help="Megatron backend: shard the fp32 main params and Adam state over data-parallel ranks")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="with --use-distributed-optimizer: save the optimizer state in each parameter's own shape "
                        "(Megatron-LM's 'fully_reshardable'), so a resume may change TP/PP, at the cost of gathering "
                        "the state over data-parallel ranks at each save (README, checkpoint memory). Default "
                        "(Megatron-LM's 'dp_reshardable'): each rank writes its own shards, no gather; a resume may "
                        "change only the data-parallel size")
    g.add_argument("--distrib-optim-fully-reshardable-mem-efficient", action="store_true",
                   help="with --dist-ckpt-optim-fully-reshardable: gather over gloo into data-parallel rank 0's host "
                        "memory only (no GPU buffer, no copy on the other ranks; rank 0 writes the optimizer state "
                        "alone). Always so on CPU")
    g = p.add_argument_group("MoE")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="each expert's hidden size (HF's moe_intermediate_size); default --ffn-hidden-size")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before the top-k, weights not renormalized (Qwen3-MoE's "
                        "norm_topk_prob=false); default: softmax over the top-k (Mixtral)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="indexed-dataset prefixes, optionally weighted: 0.3 A 0.7 B (default: the stdlib corpus)")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-type", default=SENTENCEPIECE, choices=TOKENIZER_TYPES,
                   help="Megatron-LM's names: a sentencepiece .model, or a local Hugging Face tokenizer directory "
                        "(tokenizer.json; never downloaded)")
    g.add_argument("--tokenizer-model", default=None,
                   help="the tokenizer the data was made with (required with --data-path; without it the default "
                        "corpus is tokenized with this one): a sentencepiece .model file, or with --tokenizer-type "
                        "HuggingFaceTokenizer a directory holding tokenizer.json")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--mock-data", action="store_true",
                   help="train on megatron-core's mock GPT dataset (synthetic documents, no files; tokenized ids "
                        "of the default or --tokenizer-model tokenizer's range): smoke tests and benchmarks")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="positions whose input token is EOD (each predicts the next document's first token) count "
                        "for nothing: not in the LM loss, not SimReg anchors or keys, not in JREG (Megatron-LM's flag)")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="position ids restart at 0 after each EOD, per document (Megatron-LM's flag)")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="each document of a packed sequence attends only to itself: a document-causal mask "
                        "(Megatron-LM's flag; the local attention only, refused on TransformerEngine's)")
    g.add_argument("--check-contamination", action="store_true",
                   help="print the share of the validation/test splits' 13-grams also in the training split "
                        "(always done for the default corpus): Megatron's --split is contiguous by document, so a "
                        "sorted corpus gives held-out documents that repeat training ones")
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="resume from iteration N under --load instead of the one latest_checkpointed_iteration.txt "
                        "names (e.g. to step back from a bad checkpoint)")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="with --load: take the model flags (--num-layers, --hidden-size, ..., --rotary-base, "
                        "--norm-epsilon, --max-position-embeddings) from the checkpoint's meta.json, overriding "
                        "the command line")
    g.add_argument("--no-load-optim", action="store_true",
                   help="load the weights only; the LR schedule follows this run's flags from the checkpoint's "
                        "iteration")
    g.add_argument("--fresh-start", action="store_true",
                   help="start from scratch when --load holds no checkpoint yet (never when it holds iter_* dirs)")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, take the LR schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-style, "
                        "--train-iters) from the flags; the schedule continues from the checkpoint's iteration")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR schedule whatever the flags say")
    g.add_argument("--allow-changed-on-resume", nargs="+", default=[], metavar="FLAG",
                   choices=list(RESUMABLE_CHANGES),
                   help="accept these data or regularizer settings differing from the checkpoint's "
                        f"(one or more of: {', '.join(RESUMABLE_CHANGES)}); each change is logged")
    g.add_argument("--exit-interval", type=int, default=None, help="save (with --save) and exit after this iteration")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--eval-tokens", type=int, default=None,
                   help="the validation budget in tokens: sets --eval-iters to cover at least this many (min 2). "
                        "Each evaluation logs val_loss_se, the loss's standard error over its batches")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None, help="default <save>/tensorboard")
    g.add_argument("--wandb-project", default=None,
                   help="also log every scalar TensorBoard gets to this Weights & Biases project (needs the wandb "
                        "package; WANDB_MODE=offline logs with no network, for `wandb sync` later)")
    g.add_argument("--wandb-exp-name", default=None, help="the wandb run's name")
    g.add_argument("--wandb-save-dir", default=None, help="where wandb writes its files (default <save>/wandb)")
    g = p.add_argument_group("SimReg and JREG")
    g.add_argument("--simreg-weight", type=float, default=0.0, help="lambda; 0 disables SimReg")
    g.add_argument("--simreg-temperature", type=float, default=0.1)
    g.add_argument("--simreg-chunk-size", type=int, default=None)
    g.add_argument("--simreg-mode", default="exact", choices=SIMREG_MODES)
    g.add_argument("--simreg-representation", default="post_norm", choices=["post_norm", "pre_norm"])
    g.add_argument("--simreg-scope", default="sequence", choices=SIMREG_SCOPES,
                   help="which tokens may pair: any two of a training sequence, or (document) only two of the same "
                        "document of a packed sequence, documents ending after each EOD input token")
    g.add_argument("--jreg-weight", type=float, default=0.0, help="alpha; 0 disables JREG")
    g.add_argument("--jreg-weighting", default="final", choices=JREG_WEIGHTINGS)


def parse_train_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-simreg train")
    add_arguments(parser)
    return finalize(parser, parser.parse_args(argv), argv)


def finalize(parser: argparse.ArgumentParser, args: argparse.Namespace, argv=None) -> argparse.Namespace:
    """Apply ``--config`` under the explicit flags, then validate."""
    if args.config:
        if not os.path.isfile(args.config):
            parser.error(f"--config {args.config}: no such file")
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            parser.error(f"--config {args.config}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = key.replace("-", "_")
            if dest not in known or dest == "config":
                parser.error(f"--config {args.config}: unknown key {key!r} (use the flag names, e.g. num-layers)")
            defaults[dest] = value
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    if args.use_checkpoint_args:
        try:
            use_checkpoint_args(args)
        except (ValueError, RuntimeError) as e:  # CheckpointError is a RuntimeError
            parser.error(str(e))
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    try:
        validate(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return args


def use_checkpoint_args(args: argparse.Namespace, log=None) -> None:
    """Megatron-LM's ``--use-checkpoint-args``: set the model flags from the ``meta.json`` of the checkpoint
    ``--load`` (``--ckpt-step``) resumes from, overriding the command line, and say which."""
    from . import checkpoint as ckpt
    from .model_setup import BOOL_KEYS, MODEL_KEYS, flag, implied_values, normalized

    if not args.load:
        raise ValueError("--use-checkpoint-args needs --load DIR (the checkpoint whose model flags to use)")
    point = ckpt.resume_point(args.load, args.ckpt_step, args.fresh_start)
    if point is None:  # --fresh-start and nothing there yet: the flags stand
        return
    iteration, meta = point
    model = normalized(meta.get("model") or {})
    if not model.get("num_layers"):
        raise ValueError(f"--use-checkpoint-args: {ckpt.iteration_dir(args.load, iteration)}/meta.json records no "
                         "model settings; pass the model flags instead")
    values = {k: model[k] for k in MODEL_KEYS if k in model}
    if "init_method_std" in model:
        values["init_method_std"] = model["init_method_std"]
    divisible = (meta.get("args") or {}).get("make_vocab_size_divisible_by")
    if divisible:
        values["make_vocab_size_divisible_by"] = divisible
    implied = {**implied_values(model), "max_position_embeddings": args.seq_length}
    changed = [f"{flag(k, getattr(args, k, None))} -> {flag(k, v)}" for k, v in values.items()
               if getattr(args, k, None) != v and not (getattr(args, k, None) is None and v == implied.get(k))]
    for k, v in values.items():
        setattr(args, k, v)
    args.padded_vocab_size = model.get("padded_vocab_size")  # as Megatron-LM: the embedding keeps its rows
    if log is None:
        launcher = args.nproc_per_node and args.nproc_per_node > 1 and "RANK" not in os.environ
        log = print if os.environ.get("RANK", "0") == "0" and not launcher else (lambda *a, **k: None)
    log(f"--use-checkpoint-args: model flags from {ckpt.iteration_dir(args.load, iteration)}/meta.json: "
        + " ".join(flag(k, v) for k, v in values.items()
                   if not (k in BOOL_KEYS and not v) and v is not None and v != implied.get(k))
        + f"; {args.padded_vocab_size} vocabulary rows"
        + (f" (overriding {'; '.join(changed)})" if changed else ""), flush=True)


def validate(a: argparse.Namespace) -> None:
    """Cross-flag rules; raises ``ValueError`` naming the flags and the fix."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.max_position_embeddings < 1:
        raise ValueError(f"--max-position-embeddings must be >= 1, got {a.max_position_embeddings}")
    if a.position_embedding_type == "learned_absolute" and a.seq_length > a.max_position_embeddings:
        raise ValueError(f"--seq-length {a.seq_length} exceeds --max-position-embeddings {a.max_position_embeddings}, "
                         "the size of the learned_absolute position table")
    for name in ("rotary_base", "norm_epsilon", "init_method_std"):
        if not getattr(a, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if a.kv_channels is None and a.hidden_size % a.num_attention_heads:
        raise ValueError(f"--hidden-size {a.hidden_size} must be divisible by --num-attention-heads "
                         f"{a.num_attention_heads}, or pass the head dimension as --kv-channels")
    for name in ("kv_channels", "moe_ffn_hidden_size"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not a.num_experts and (a.moe_ffn_hidden_size or a.moe_router_pre_softmax):
        raise ValueError("--moe-ffn-hidden-size and --moe-router-pre-softmax need --num-experts")
    if a.use_rope_scaling and (a.position_embedding_type != "rope" or not (a.rope_scaling_factor or 0) > 0):
        raise ValueError(f"--use-rope-scaling needs --position-embedding-type rope and --rope-scaling-factor > 0 "
                         f"(got {a.position_embedding_type}, {a.rope_scaling_factor})")
    groups = a.num_query_groups or a.num_attention_heads
    if a.num_attention_heads % groups:
        raise ValueError(f"--num-attention-heads {a.num_attention_heads} must be divisible by --num-query-groups {groups}")
    tp = a.tensor_model_parallel_size
    if a.num_attention_heads % tp or groups % tp:
        raise ValueError(f"--num-attention-heads and --num-query-groups must be divisible by "
                         f"--tensor-model-parallel-size {tp}")
    if a.num_layers % a.pipeline_model_parallel_size:
        raise ValueError(f"--num-layers {a.num_layers} must be divisible by --pipeline-model-parallel-size "
                         f"{a.pipeline_model_parallel_size}")
    if a.sequence_parallel and a.seq_length % (tp * a.context_parallel_size):
        raise ValueError("--seq-length must be divisible by tensor x context parallel size with --sequence-parallel")
    if a.context_parallel_size > 1 and a.seq_length % (2 * a.context_parallel_size):
        raise ValueError("--seq-length must be divisible by 2 * --context-parallel-size (zigzag layout)")
    stage_layers = a.num_layers // a.pipeline_model_parallel_size
    if a.recompute_granularity == "full":
        if a.recompute_method is None or a.recompute_num_layers is None:
            raise ValueError("--recompute-granularity full needs --recompute-method uniform|block and "
                             "--recompute-num-layers N")
        if not 1 <= a.recompute_num_layers <= stage_layers:
            raise ValueError(f"--recompute-num-layers must be between 1 and the layers per pipeline stage "
                             f"({stage_layers}), got {a.recompute_num_layers}")
        if a.recompute_method == "uniform" and stage_layers % a.recompute_num_layers:
            raise ValueError(f"--recompute-method uniform needs --recompute-num-layers ({a.recompute_num_layers}) to "
                             f"divide the layers per pipeline stage ({stage_layers})")
    elif a.recompute_method is not None or a.recompute_num_layers is not None:
        raise ValueError("--recompute-method and --recompute-num-layers go with --recompute-granularity full "
                         "(selective recompute takes neither)")
    if a.num_experts and tp > 1 and not a.sequence_parallel:
        raise ValueError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (Megatron-core rule)")
    if a.deepspeed and a.pipeline_model_parallel_size > 1:
        raise ValueError("--deepspeed with --pipeline-model-parallel-size > 1 is not supported; "
                         "use the Megatron backend (drop --deepspeed) for pipeline parallelism")
    if a.deepspeed and a.calculate_per_token_loss:
        raise ValueError("--calculate-per-token-loss is the Megatron backend's (DeepSpeed averages each micro-batch's "
                         "loss); drop --deepspeed or the flag")
    if a.deepspeed and a.use_distributed_optimizer:
        raise ValueError("--use-distributed-optimizer is the Megatron backend's; with --deepspeed use --zero-stage")
    if a.dist_ckpt_optim_fully_reshardable and not a.use_distributed_optimizer:
        raise ValueError("--dist-ckpt-optim-fully-reshardable sets the distributed optimizer's checkpoint format; it "
                         "needs --use-distributed-optimizer (without it the optimizer state is always saved in each "
                         "parameter's shape)")
    if a.distrib_optim_fully_reshardable_mem_efficient and not a.dist_ckpt_optim_fully_reshardable:
        raise ValueError("--distrib-optim-fully-reshardable-mem-efficient goes with "
                         "--dist-ckpt-optim-fully-reshardable")
    if a.data_path and not a.tokenizer_model:
        raise ValueError("--data-path needs --tokenizer-model (the tokenizer the data was tokenized with)")
    if a.tokenizer_type != SENTENCEPIECE and not a.tokenizer_model:
        raise ValueError(f"--tokenizer-type {a.tokenizer_type} needs --tokenizer-model (a local directory with "
                         "tokenizer.json); without --data-path the default corpus is tokenized with it")
    if a.tokenizer_model:
        from ..data.tokenizer import check_tokenizer_path

        check_tokenizer_path(a.tokenizer_type, a.tokenizer_model)
    if a.override_opt_param_scheduler and a.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each "
                         "other: pick the flags' schedule or the checkpoint's")
    if a.ckpt_step is not None and (a.ckpt_step < 0 or not a.load):
        raise ValueError("--ckpt-step N needs --load DIR and N >= 0")
    if a.eval_iters < 1 or (a.eval_tokens is not None and a.eval_tokens < 1):
        raise ValueError("--eval-iters and --eval-tokens must be >= 1")
    if a.save_interval is not None and a.save_interval < 1:
        raise ValueError("--save-interval must be >= 1")
    if a.save_interval and not a.save:
        raise ValueError("--save-interval needs --save DIR")
    if a.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--wandb-project needs the wandb package, which is not installed: pip install wandb "
                             "(with WANDB_MODE=offline it logs without a network), or drop --wandb-project") from None
    if (a.wandb_exp_name or a.wandb_save_dir) and not a.wandb_project:
        raise ValueError("--wandb-exp-name and --wandb-save-dir need --wandb-project")
    if a.mock_data and a.data_path:
        raise ValueError("--mock-data and --data-path exclude each other: mock data reads no files")
    if a.reset_attention_mask and a.context_parallel_size > 1:
        raise ValueError("--reset-attention-mask with --context-parallel-size > 1 is not supported: the "
                         "document-causal [s, s] mask is not split over context-parallel ranks; drop one of them")
    if a.simreg_weight < 0 or a.jreg_weight < 0:
        raise ValueError("--simreg-weight and --jreg-weight must be >= 0")
    if a.simreg_temperature <= 0:
        raise ValueError(f"--simreg-temperature must be > 0, got {a.simreg_temperature}")
    if a.simreg_chunk_size is not None and a.simreg_chunk_size <= 0:
        raise ValueError(f"--simreg-chunk-size must be > 0, got {a.simreg_chunk_size}")
    if a.lr_warmup_iters and a.lr_warmup_iters >= a.train_iters:
        raise ValueError(f"--lr-warmup-iters ({a.lr_warmup_iters}) must be < --train-iters ({a.train_iters})")
    if a.lr < 0 or a.min_lr < 0 or a.min_lr > a.lr:
        raise ValueError(f"need 0 <= --min-lr ({a.min_lr}) <= --lr ({a.lr})")
