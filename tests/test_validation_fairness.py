"""The default corpus's validation split measures what training learns (issue 17).

On the old corpus (path order) the validation split was seven ``encodings/cp86x.py`` tables: after 30
iterations of the run below the validation loss sat 0.57 nats *below* the training loss (11 standard errors),
2 nats later in longer runs.

The bound. Early in a run every training batch is unseen when its loss is logged (first epoch), so the mean
training loss of the last ``K`` iterations is itself a held-out estimate on the training split, with standard
error ``se_train = std / sqrt(K)``. The validation loss is another, with ``val_loss_se`` from the trainer.
If the splits are samples of one distribution, the two differ only by noise plus the drift of the still
falling loss over the window (here below one standard error), so ``|val - train| <= 4 * sqrt(se_train**2 +
se_val**2)`` (about 0.2 nats here). Measured on this corpus: 0.06 (1.1 standard errors).
"""

import math
import statistics

import pytest

from trainer_utils import metrics, train

K = 10


def test_training_and_validation_loss_agree_on_the_default_corpus(tmp_path, cache):
    save = str(tmp_path / "run")
    out = train("--num-layers", "2", "--hidden-size", "64", "--seq-length", "128", "--micro-batch-size", "8",
                "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "2", "--train-iters", "30",
                "--eval-interval", "10", "--eval-tokens", "16384", "--save", save, cache=cache)
    assert "contamination (held-out n-grams also in training): valid 0.0" in out.stdout, out.stdout[-2000:]
    records = metrics(save)
    last = records[-1]
    train_losses = [r["lm_loss"] for r in records[-K:]]
    se_train = statistics.stdev(train_losses) / math.sqrt(K)
    gap, bound = last["val_loss"] - statistics.mean(train_losses), 4 * math.hypot(se_train, last["val_loss_se"])
    assert last["val_loss_se"] > 0 and abs(gap) <= bound, (gap, bound, se_train, last["val_loss_se"])
    # the final evaluation's batches, which compare pairs across runs: 16384 tokens = 16 batches of 8 x 128
    evaluated = [r for r in records if "val_loss" in r]
    assert [("val_batches" in r) for r in evaluated] == [False, False, True]
    assert len(last["val_batches"]["losses"]) == 16 and len(last["val_batches"]["sha256"]) == 64
    assert statistics.mean(last["val_batches"]["losses"]) == pytest.approx(last["val_loss"], rel=1e-5)
