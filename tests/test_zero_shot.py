"""Local zero-shot tasks: the shipped data are well-formed and reproducible, and lm-eval scores them in-process
on a tiny random Llama; unknown tasks, missing model dirs and a missing lm-eval give clear errors."""

import collections
import importlib.util
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

import pytest

from megatron_simreg.analysis import zero_shot as zs

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"id", "source", "context", "choices", "answer"}


def _rows(task):
    with open(zs.TASKS_DIR / f"{task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------
# the shipped data
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", zs.LOCAL_TASKS)
def test_shipped_data_are_well_formed(task):
    path = zs.TASKS_DIR / f"{task}.jsonl"
    assert path.stat().st_size < 150_000
    rows = _rows(task)
    assert len(rows) == 200
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({(r["context"], tuple(r["choices"])) for r in rows}) == len(rows), "an example is repeated"
    for r in rows:
        assert set(r) == FIELDS, r["id"]
        assert r["source"].startswith("test/"), "held-out code only: the training corpus excludes test/"
        assert isinstance(r["context"], str) and r["context"].strip()
        choices = r["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4, r["id"]
        assert all(isinstance(c, str) and c.strip() and c.endswith("\n") for c in choices), r["id"]
        assert isinstance(r["answer"], int) and 0 <= r["answer"] < 4, r["id"]
        if task == "pycode_next_line":  # same indentation: the indent alone does not give the answer away
            assert len({c[:len(c) - len(c.lstrip(" "))] for c in choices}) == 1, r["id"]
        if task == "pycode_closing":  # runs of the same length: length does not give it away either
            assert len({len(c) for c in choices}) == 1, r["id"]
    # Not trivially identifiable: the answer's position is spread out, and it is not usually the longest or
    # the shortest choice (acc, a sum of log-probabilities, favours short choices).
    positions = collections.Counter(r["answer"] for r in rows)
    assert all(0.15 * len(rows) <= positions[i] <= 0.35 * len(rows) for i in range(4)), positions
    for pick in (max, min):
        unique_extreme = sum(1 for r in rows if [len(c) for c in r["choices"]].count(pick(map(len, r["choices"]))) == 1
                             and len(r["choices"][r["answer"]]) == pick(map(len, r["choices"])))
        assert unique_extreme < 0.4 * len(rows), (pick.__name__, unique_extreme)
    # No single answer dominates (e.g. "))" or "def").
    answers = collections.Counter(r["choices"][r["answer"]].split()[0] for r in rows)
    assert answers.most_common(1)[0][1] <= 0.2 * len(rows), answers.most_common(3)


def test_written_yamls_point_at_the_installed_data(tmp_path):
    yaml = pytest.importorskip("yaml")
    out = zs.write_task_yamls(str(tmp_path / "tasks"))
    for task in zs.LOCAL_TASKS:
        cfg = yaml.safe_load(Path(out, f"{task}.yaml").read_text())
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        assert cfg["task"] == task and os.path.isabs(data) and Path(data) == zs.TASKS_DIR / f"{task}.jsonl"
        assert cfg["target_delimiter"] == "" and cfg["output_type"] == "multiple_choice"


def test_generator_reproduces_the_shipped_files(tmp_path, monkeypatch):
    manifest = json.loads((zs.TASKS_DIR / "manifest.json").read_text())
    if manifest["python"] != platform.python_version():
        pytest.skip(f"the data were generated with Python {manifest['python']}; this is "
                    f"{platform.python_version()}, whose test/ folder differs")
    if not (Path(sysconfig.get_paths()["stdlib"]) / "test").is_dir():
        pytest.skip("this Python was installed without its test/ folder")
    spec = importlib.util.spec_from_file_location("make_zero_shot_tasks", REPO / "tools" / "make_zero_shot_tasks.py")
    gen = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gen)  # dataclasses look their module up there
    spec.loader.exec_module(gen)
    gen.generate(str(tmp_path))
    for name in [f"{t}.jsonl" for t in zs.LOCAL_TASKS] + ["manifest.json"]:
        assert (tmp_path / name).read_bytes() == (zs.TASKS_DIR / name).read_bytes(), name


# ----------------------------------------------------------------------------
# evaluation with lm-eval on a tiny model
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random 2-layer Llama (hidden 32) with a sentencepiece tokenizer trained on ~30 KB of this package."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_simreg.conversion.hf_side import write_tokenizer
    from megatron_simreg.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("tiny_hf")
    text = root / "text.txt"
    text.write_text(Path(zs.__file__).read_text() + Path(__file__).read_text())
    sp_model = train_sentencepiece([str(text)], str(root / "sp"), vocab_size=512)
    out = root / "hf"
    vocab = write_tokenizer(sp_model, str(out))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture
def one_thread():
    """On 2 shared cores, OpenMP threads contending with other processes make a tiny model ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_evaluate_local_tasks(tiny_hf, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval accelerate)")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install accelerate)")
    monkeypatch.chdir(tmp_path)  # an arbitrary cwd: the data paths must not depend on it
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    limit = 6
    res = zs.evaluate_zero_shot(tiny_hf, ",".join(zs.LOCAL_TASKS), limit=limit, batch_size=8,
                                work_dir=str(tmp_path / "w"))
    assert list(res) == zs.LOCAL_TASKS
    for task, r in res.items():
        assert r["metric"] == "acc" and r["n"] == limit, (task, r)
        for key in ("value", "acc_norm"):
            assert type(r[key]) is float and 0.0 <= r[key] <= 1.0, (task, r)
        assert type(r["stderr"]) is float and r["stderr"] >= 0.0
    assert (tmp_path / "w" / "lm_eval_tasks" / "pycode_keyword.yaml").is_file()
    assert {k: os.environ.get(k) for k in env_before} == env_before, "offline mode must not leak"


def test_unknown_task_names_the_fix(tiny_hf):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval accelerate)")
    zs.check_tasks(["arc_easy", "pycode_closing"])  # in lm-eval's registry / local: accepted
    with pytest.raises(zs.UnknownTaskError, match=r"'pycode_nextline'.*did you mean.*pycode_next_line.*include_path"):
        zs.evaluate_zero_shot(tiny_hf, ["pycode_nextline"])
    with pytest.raises(ValueError, match="no tasks"):
        zs.evaluate_zero_shot(tiny_hf, [])
    with pytest.raises(zs.ZeroShotError, match="include_path folder"):
        zs.check_tasks("pycode_closing,my_task", include_path="/nonexistent/tasks")


def test_missing_model_dir_names_the_fix(tmp_path):
    with pytest.raises(zs.ModelDirError, match="not found.*export-hf"):
        zs.evaluate_zero_shot(str(tmp_path / "nope"), zs.LOCAL_TASKS)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"")
    with pytest.raises(zs.ModelDirError, match="no config.json.*model.pt"):
        zs.evaluate_zero_shot(str(tmp_path / "ckpt"), zs.LOCAL_TASKS)


def test_missing_lm_eval_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(zs.MissingDependencyError, match="pip install lm-eval accelerate") as e:
        zs.evaluate_zero_shot(str(tmp_path), zs.LOCAL_TASKS)
    assert isinstance(e.value, ImportError) and isinstance(e.value, ValueError)
