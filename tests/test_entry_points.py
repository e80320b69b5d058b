"""The demo, the example and the benchmark run (tiny sizes; they are smoke tests, not timings)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd):
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_demo_tiny(tmp_path, cache):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("num-layers: 2\nhidden-size: 32\nnum-attention-heads: 4\nseq-length: 32\nmicro-batch-size: 2\n"
                   "global-batch-size: 2\ntrain-iters: 4\neval-interval: 2\neval-iters: 1\n")
    out = run("-m", "megatron_simreg.cli", "demo", "--out", str(tmp_path / "demo"), "--config", str(cfg),
              "--data-cache-path", cache, "--seeds", "1", "2")
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report and "**Speed-up**" in report
    assert "fewer than 3 seeds: no claim can be made" in report  # two seeds: no interval, no claim
    assert (tmp_path / "demo" / "val_loss.png").stat().st_size > 1000
    assert "report:" in out


def test_the_demos_training_run_hides_only_the_known_warnings(tmp_path, cache):
    """The demo's first training run (its config and seed; 2 iterations): one notice line replaces megatron-core's
    fallback warnings, none of the known warnings is printed, and a warning nobody knows (planted as
    megatron-core's, with a new message) still is."""
    import warnings

    from megatron_simreg import known_warnings
    from megatron_simreg.commands import demo

    shim = ROOT / "tests" / "shims" / "plant_unknown_warning.py"
    short = ["--train-iters", "2", "--lr-warmup-iters", "1", "--eval-iters", "1"]
    out = subprocess.run([sys.executable, str(shim), "train", "--config", str(demo.CONFIG), "--seed", "1", *short,
                          "--save", str(tmp_path / "run"), "--data-cache-path", cache],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("TransformerEngine/apex not installed") == 1, out.stdout
    assert "planted: a megatron-core warning nobody has seen before" in out.stderr, out.stderr[-3000:]
    for line in out.stderr.splitlines():
        for category, _, message in known_warnings.KNOWN:
            assert not (category.__name__ in line and re.search(message, line)), line
    assert "full scope is deprecated" not in out.stderr  # not filtered: no longer triggered (compat)
    # the filter is exact: a known message from another module, or another message from the known module, shows
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert known_warnings.install()
        fallback = "Apex is not installed. Falling back to Torch Norm"
        warnings.warn_explicit(fallback, UserWarning, "x.py", 1, module="megatron.core.models.backends")
        warnings.warn_explicit(fallback, UserWarning, "x.py", 1, module="my_package")
        warnings.warn_explicit("Apex is installed", UserWarning, "x.py", 1, module="megatron.core.models.backends")
    assert [(w.message.args[0], w.filename) for w in seen] == [(fallback, "x.py"), ("Apex is installed", "x.py")]


def test_explicit_warning_options_turn_the_filter_off(monkeypatch):
    from megatron_simreg import known_warnings

    monkeypatch.setattr(sys, "warnoptions", ["default"])
    assert known_warnings.install() is False


def test_help_is_plain_text_and_lists_what_each_command_accepts(capsys):
    """argparse prints help as is: no reStructuredText; import-hf/export-hf name every accepted HF model type."""
    from megatron_simreg import cli
    from megatron_simreg.conversion.hf_side import ACCEPTED_MODEL_TYPES

    texts = {"": cli.build_parser().format_help()}
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        texts[name] = capsys.readouterr().out
    for name, text in texts.items():
        assert text.strip() and not re.search(r"``|:(mod|func|class|data|meth):", text), (name, text)
    shown = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
             "qwen3_moe": "Qwen3-MoE"}
    assert set(shown) == set(ACCEPTED_MODEL_TYPES)
    for name in ("import-hf", "export-hf"):
        for model_type in ACCEPTED_MODEL_TYPES:
            assert shown[model_type] in " ".join(texts[""].split()), (name, model_type)
        assert cli.COMMANDS[name][1] in " ".join(texts[name].split())


def test_demo_default_config_exists():
    """tools/demo.sh runs the demo without --config: its default must be the shipped file."""
    from megatron_simreg.commands import demo

    assert demo.CONFIG.is_file() and demo.CONFIG.samefile(ROOT / "examples" / "configs" / "demo_cpu.yaml")


def test_cli_without_command_prints_help():
    out = subprocess.run([sys.executable, "-m", "megatron_simreg.cli"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "demo" in out.stdout


def test_example_runs():
    assert "step 4" in run("examples/simreg_jreg_in_a_training_step.py")


def test_bench_loss_runs():
    out = run("tools/bench_loss.py", "--seq", "64", "--hidden", "16", "--repeats", "1")
    assert "| 64 | 16 | naive |" in out and "| 64 | 16 | blockwise |" in out


def test_bench_megatron_profiles_what_the_regularizer_adds():
    out = run("tools/bench_megatron.py", "--preset", "cpu-test", "--variants", "baseline", "simreg",
              "--iters", "1", "--warmup", "0", "--profile", "3")
    assert "| baseline |" in out and "| simreg |" in out and "failed" not in out
    table = out.split("simreg vs baseline")[1].splitlines()
    assert "operator calls" in table[0]
    assert table[1] == "| operator | calls | self host ms |"
    assert len([line for line in table if line.startswith("| `")]) == 3


def test_bench_triton_configs_checks_every_configuration_under_the_interpreter():
    pytest.importorskip("triton", reason="the Triton kernel's benchmark needs the triton package")
    out = subprocess.run(
        [sys.executable, "tools/bench_triton_configs.py", "--device", "cpu", "--seq", "40", "--hidden", "24",
         "--block-m", "16", "--block-n", "16", "32", "--block-k", "16", "--warps", "4", "--stages", "1",
         "--dtype", "fp32", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| 16 |")]
    assert len(rows) == 4 + 2  # 2 tiles x 2 split rules forward, 2 tiles backward
    assert all(float(r[-2]) < 1e-5 for r in rows)  # error against naive fp32
