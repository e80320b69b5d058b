"""Megatron-LM's data and logging flags in ``megatron-simreg train`` (issue 26 items 1 and 4): ``--eod-mask-loss``,
``--reset-position-ids``, ``--reset-attention-mask`` on the default corpus, in the model and on resume; ``--mock-data``;
and item 5, ``--wandb-*``."""

import json
import os
import sys

import pytest
import torch

from megatron_utils import build_tiny_gpt, run_distributed
from trainer_utils import metrics, train

FLAGS = ["--eod-mask-loss", "--reset-position-ids", "--reset-attention-mask"]


def _samples(rank, world, cache):
    """With FLAGS, the first train samples of the default corpus (seq 256) holding two EOD tokens or more (2 of the
    first 400); without them, samples 0 and 1; and the EOD id."""
    from megatron_simreg.training.args import parse_train_args
    from megatron_simreg.training.data import build_datasets

    out = []
    for flags in (FLAGS, []):
        args = parse_train_args(["--data-cache-path", cache, "--seq-length", "256", *flags])
        train_ds, _, tokenizer = build_datasets(args, gbs=1, train_samples=400)
        found = []
        for i in range(400):
            s = {k: torch.as_tensor(v) for k, v in train_ds[i].items()}
            if (s["tokens"] == tokenizer.eod).sum() >= 2 or not flags:
                found.append(s)
            if len(found) == 2:
                break
        out.append(found)
    return out, tokenizer.eod


def _documents(tokens, eod):
    """``doc[i]``: the document of position ``i``; a document ends with (and includes) its EOD token."""
    return torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), (tokens[:-1] == eod).long()]), 0)


def test_the_flags_cut_packed_sequences_into_documents(cache):
    (samples, plain), eod = run_distributed(_samples, 1, (cache,), timeout=300)[0]
    assert len(samples) == 2, "the default corpus should pack short documents together at seq 256"
    for s in samples:
        doc = _documents(s["tokens"], eod)
        pos = torch.arange(len(doc))
        starts = torch.tensor([int((doc == d).nonzero()[0]) for d in doc.tolist()])
        assert torch.equal(s["position_ids"], pos - starts)  # positions restart after each EOD
        same_doc_causal = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
        assert torch.equal(~s["attention_mask"][0], same_doc_causal)  # True = masked out (Megatron's convention)
        # Megatron's --eod-mask-loss: a position whose input is EOD (it predicts the next document's first token)
        # counts for nothing; the EOD label itself is still predicted
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == eod)
    assert "attention_mask" not in plain[0] and bool((plain[0]["loss_mask"] == 1).all())
    assert torch.equal(plain[0]["position_ids"], torch.arange(256))


def _logits_of_the_second_document(rank, world):
    """Document 2's outputs for two versions of document 1, with and without the document mask."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    model, _ = build_tiny_gpt()
    model.eval()
    eod, s = 0, 32
    tokens = torch.randint(1, 64, (1, s), generator=torch.Generator().manual_seed(0))
    tokens[0, 11] = eod  # document 1 is positions 0-11, document 2 starts at 12
    other_first = torch.cat([torch.randint(1, 64, (1, 11)), tokens[:, 11:]], 1)  # document 1 changed
    out = {}
    for with_mask in (True, False):
        out[with_mask] = []
        for first in (tokens, other_first):
            mask, _, pos = _get_ltor_masks_and_position_ids(first[0], eod, reset_position_ids=True,
                                                            reset_attention_mask=with_mask, eod_mask_loss=False,
                                                            create_attention_mask=True)
            with torch.no_grad():
                out[with_mask].append(model(first, pos[None], mask[None] if with_mask else None)[:, 12:].clone())
    return out


def test_reset_attention_mask_keeps_one_document_from_attending_to_another():
    out = run_distributed(_logits_of_the_second_document, 1, timeout=120)[0]
    same, changed = out[True]
    assert torch.equal(same, changed)  # document 2's outputs do not see document 1's tokens
    a, b = out[False]
    assert (a - b).abs().max() > 1e-3  # ... which they do without the mask: the check can see a leak


def test_document_flags_are_checked_on_resume():
    from types import SimpleNamespace

    from megatron_simreg.training.resume_checks import check_data, data_settings

    base = dict(seed=1, data_path=None, split="969,30,1", tokenizer_type="SentencePieceTokenizer",
                simreg_weight=0.0, simreg_temperature=0.1, simreg_scope="sequence", jreg_weight=0.0, mock_data=False,
                eod_mask_loss=False, reset_position_ids=False, reset_attention_mask=False)
    saved = data_settings(SimpleNamespace(**base), 8, None)
    old = {k: v for k, v in saved.items() if k not in ("mock_data", "eod_mask_loss", "reset_position_ids",
                                                       "reset_attention_mask", "simreg_scope")}
    now = data_settings(SimpleNamespace(**{**base, "eod_mask_loss": True}), 8, None)
    check_data(old, saved, [], "here")  # a checkpoint from before the flags were recorded had them off
    with pytest.raises(ValueError, match="--eod-mask-loss: checkpoint=False run=True"):
        check_data(old, now, [], "here")
    check_data(saved, now, ["eod-mask-loss"], "here", log=lambda *a: None)
    document = data_settings(SimpleNamespace(**{**base, "simreg_scope": "document"}), 8, None)
    with pytest.raises(ValueError, match="--simreg-scope: checkpoint='sequence' run='document'"):
        check_data(old, document, [], "here")


def test_one_run_with_mock_data_the_document_flags_and_wandb_offline(tmp_path, cache):
    """The plumbing, end to end in one run: --mock-data (megatron-core's MockGPTDataset), the three document flags
    and --simreg-scope document recorded in the checkpoint, and wandb offline (no network) given the scalars
    metrics.jsonl holds."""
    save, record = str(tmp_path / "run"), tmp_path / "wandb.jsonl"
    train("--train-iters", "2", "--save", save, "--simreg-weight", "0.1", "--simreg-scope", "document",
          "--jreg-weight", "1.0", "--mock-data", *FLAGS, "--wandb-project", "proj", "--wandb-exp-name", "exp", cache=cache, shim="record_wandb.py",
          env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "SIMREG_WANDB_RECORD": str(record)})
    want = metrics(save)
    data = json.load(open(os.path.join(save, "iter_0000002", "meta.json")))["data"]
    assert data["mock_data"] is True and all(data[f[2:].replace("-", "_")] is True for f in FLAGS)
    assert data["simreg_scope"] == "document"
    logged = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["step"] for r in logged] == [r["iteration"] for r in want] == [1, 2]
    for got, ref in zip(logged, want):
        assert got["project"] == "proj" and got["name"] == "exp"
        for key in ("lm_loss", "simreg_loss", "jreg_loss", "lr", "grad_norm"):
            assert got[key] == ref[key], key
    assert any(name.startswith("offline-run-") for name in os.listdir(os.path.join(save, "wandb", "wandb")))


def test_wandb_flags_without_wandb_installed_say_how_to_get_it(capsys, monkeypatch):
    from megatron_simreg.training.args import parse_train_args

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SystemExit):
        parse_train_args(["--wandb-project", "p"])
    assert "pip install wandb" in capsys.readouterr().err
