"""The fused Triton SimReg kernel (impl="triton") against the naive float64 reference.

Without a GPU the kernels run under Triton's CPU interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before triton is imported. So that the
setting does not leak into other tests, all interpreter cases run in one
subprocess (this file run as a script), and the tests below check its
results. Tiny sizes and 16-wide blocks keep it to seconds; the sizes are not
multiples of the blocks, the forward splits its keys over 2 programs and the
backward works in 16-row slabs, so every merge path runs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import megatron_simreg as ms

# These tests skip only when `import triton` itself fails (tests/expected_skips.txt does not list it, so a CI run
# fails then too, saying why); a failing import of the project's own kernel module fails them.
SKIP_REASON = "triton cannot be imported (pip install triton); the kernel cannot run, not even in the interpreter"


def triton_import_error():
    """Why ``import triton`` fails here, or None."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure of triton's own import
        return f"{type(e).__name__}: {e}"
    return None

# name -> (dtype, chunk_size, kind); kinds: "terms" (public simreg_terms path: self keys,
# normalized inside), "keys" (separate keys with positions, as distributed exact
# mode passes), "shard" (self keys, non-contiguous positions, as shard_local passes);
# "_raw": raw states normalized inside (norm_eps), as the Megatron integration passes them;
# "_docs": document scope (EOD = label 4 of 5: documents of ~5 tokens).
CASES = {
    "fp32": ("float32", None, "terms"),
    "fp32_chunk10": ("float32", 10, "terms"),
    "fp32_chunk_whole": ("float32", 64, "terms"),
    "fp32_tau1": ("float32", None, "terms_tau1"),
    "bf16": ("bfloat16", None, "terms"),
    "bf16_chunk10": ("bfloat16", 10, "terms"),
    "fp16": ("float16", None, "terms"),
    "fp32_keys": ("float32", None, "keys"),
    "fp32_keys_chunk5": ("float32", 5, "keys"),
    "bf16_keys_chunk5": ("bfloat16", 5, "keys"),
    "fp32_shard_chunk5": ("float32", 5, "shard"),
    "fp32_keys_raw_chunk5": ("float32", 5, "keys_raw"),
    "bf16_keys_raw": ("bfloat16", None, "keys_raw"),
    "fp32_shard_raw": ("float32", None, "shard_raw"),
    "fp32_docs": ("float32", None, "terms_docs"),
    "fp32_docs_chunk10": ("float32", 10, "terms_docs"),
    "bf16_docs": ("bfloat16", None, "terms_docs"),
    "fp32_keys_docs_chunk5_raw": ("float32", 5, "keys_docs_raw"),
    "fp32_shard_docs": ("float32", None, "shard_docs"),
}
EOD = 4


def _worker() -> dict:  # runs in the subprocess, under the interpreter
    assert os.environ.get("TRITON_INTERPRET") == "1"
    error = triton_import_error()
    if error:
        return {"triton_import_error": error}
    from megatron_simreg.kernels import simreg_triton  # an ImportError here is a failure, not a skip
    from megatron_simreg.losses.simreg import NORM_EPS, document_ids, normalize

    small = dict(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1, num_splits=2, slab_rows=16)
    for table in (simreg_triton.FWD_CONFIG, simreg_triton.BWD_CONFIG):
        for key in table:
            table[key] = dict(small)

    def data(b, s, h, dtype, seed, classes=5):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(b, s, h, generator=g, dtype=torch.float64).to(dtype)
        labels = torch.randint(0, classes, (b, s), generator=g)
        labels[0, 3] = -100
        mask = (torch.rand(b, s, generator=g) > 0.2).float()
        mask[1, :] = 1.0
        mask[1, 10:] = 0.0  # a row that is mostly masked: blocks without any valid anchor
        weights = torch.randn(b, s, generator=g, dtype=torch.float64)  # upstream gradient of per_token
        return hidden, labels, mask, weights

    def terms_and_grads(fn, hidden, weights):
        h = hidden.clone().requires_grad_()
        t = fn(h)
        (t.per_token.double() * weights).sum().backward()
        return t.per_token.detach().double(), t.anchors, h.grad.double()

    def compare(got, ref, naive=None):
        (v, a, g), (rv, ra, rg) = got, ref
        out = {
            "val_err": (v - rv).abs().max().item(),
            "grad_err": (g - rg).abs().max().item(),
            "grad_rel": ((g - rg).norm() / rg.norm().clamp_min(1e-30)).item(),
            "grad_scale": rg.abs().max().item(),
            "anchors_equal": torch.equal(a, ra),
            "num_anchors": int(ra.sum()),
            "finite": bool(torch.isfinite(v).all() and torch.isfinite(g).all()),
        }
        if naive is not None:
            out["naive_grad_rel"] = ((naive[2] - rg).norm() / rg.norm().clamp_min(1e-30)).item()
        return out

    results = {}
    for name, (dtype_name, chunk, kind) in CASES.items():
        dtype = getattr(torch, dtype_name)
        hidden, labels, mask, weights = data(2, 37, 24, dtype, seed=len(results))
        valid = (labels != -100) & (mask == 1)
        tau = 1.0 if kind == "terms_tau1" else 0.1
        docs = document_ids(labels, EOD) if "_docs" in kind else None
        if kind.startswith("terms"):
            scope = dict(scope="document", eod_id=EOD) if docs is not None else {}

            def run(impl, h):
                return ms.simreg_terms(h, labels, mask, temperature=tau, chunk_size=chunk, impl=impl, **scope)
            got = terms_and_grads(lambda h: run("triton", h), hidden, weights)
            again = terms_and_grads(lambda h: run("triton", h), hidden, weights)
            ref = terms_and_grads(lambda h: run("naive", h), hidden.double(), weights)
            naive = terms_and_grads(lambda h: run("naive", h), hidden, weights)
            results[name] = compare(got, ref, naive)
            results[name]["deterministic"] = all(torch.equal(x, y) for x, y in zip(got, again))
            continue
        pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 28, 29, 30, 31, 32, 33, 34, 35, 36])  # zigzag-like shard

        raw = kind.endswith("_raw")

        def run(impl, z):
            kw = dict(temperature=tau, chunk_size=chunk, impl=impl, q_positions=pos, norm_eps=NORM_EPS if raw else None)
            if docs is not None:
                kw["q_docs"] = docs[:, pos]
            if kind.startswith("keys"):
                kw["keys"] = (z, labels, valid)
                if docs is not None:
                    kw["k_docs"] = docs
            return ms.simreg_per_token(z[:, pos], labels[:, pos], valid[:, pos], **kw)
        # The (normalized, or raw) states are the leaf in the case's dtype; the reference sees the same values in
        # float64. With keys, the leaf reaches the loss as anchors and as keys, so both gradients are checked.
        z = hidden if raw else normalize(hidden.double()).to(dtype)
        w = weights[:, pos]
        got = terms_and_grads(lambda x: run("triton", x), z, w)
        ref = terms_and_grads(lambda x: run("naive", x), z.double(), w)
        results[name] = compare(got, ref)

    # No positive anywhere (every label unique), and a fully masked batch: exactly 0, zero gradients.
    hidden = torch.randn(2, 21, 24, requires_grad=True)
    loss = ms.simreg_loss(hidden, torch.arange(42).view(2, 21), impl="triton")
    loss.backward()
    masked = torch.randn(2, 21, 24, requires_grad=True)
    loss_m = ms.simreg_loss(masked, torch.zeros(2, 21, dtype=torch.long), torch.zeros(2, 21), impl="triton")
    loss_m.backward()
    results["no_positives"] = {
        "loss": loss.item(), "grad_zero": bool(torch.equal(hidden.grad, torch.zeros_like(hidden))),
        "masked_loss": loss_m.item(), "masked_grad_zero": bool(torch.equal(masked.grad, torch.zeros_like(masked))),
    }
    return results


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if "triton_import_error" in res:
        pytest.skip(f"{SKIP_REASON} (under TRITON_INTERPRET=1: {res['triton_import_error']})")
    return res


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_grads_match_naive_float64(results, name):
    r = results[name]
    assert r["finite"] and r["anchors_equal"] and r["num_anchors"] > 0, r
    assert r["val_err"] < 1e-4, r
    if CASES[name][0] == "float32":
        assert r["grad_err"] < 1e-4, r
    else:
        # The gradient of a bf16/fp16 input is itself bf16/fp16: its own rounding (2^-8 / 2^-11
        # relative) exceeds 1e-4 for gradients of size ~1. Ask for that rounding's order of
        # magnitude, and within 3x the naive implementation's error on the same input (measured: ~2.3x;
        # the kernel adds the bf16 rounding of dS for its GEMMs).
        assert r["grad_rel"] < 1e-2, r
        if "naive_grad_rel" in r:
            assert r["grad_rel"] <= 3 * r["naive_grad_rel"] + 1e-3, r
    if "deterministic" in r:
        assert r["deterministic"], r


def test_no_positive_rows_give_exact_zero(results):
    r = results["no_positives"]
    assert r == {"loss": 0.0, "grad_zero": True, "masked_loss": 0.0, "masked_grad_zero": True}


def test_missing_triton_names_the_fix(monkeypatch):
    # Simulate an environment without triton: importing it fails.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "megatron_simreg.kernels.simreg_triton", raising=False)
    hidden, labels = torch.randn(1, 8, 4), torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ImportError, match=r"pip install triton"):
        ms.simreg_loss(hidden, labels, impl="triton")


def test_auto_keeps_cpu_behaviour():
    from megatron_simreg.losses.simreg import resolve_impl

    assert resolve_impl("auto", 100, torch.zeros(1, 2, 3)) == "naive"
    assert resolve_impl("auto", 4096, torch.zeros(1, 2, 3)) == "blockwise"
    assert ms.SimRegConfig(impl="triton").impl == "triton"


def test_cpu_tensors_without_interpreter_are_refused():
    error = triton_import_error()
    if error:
        pytest.skip(f"{SKIP_REASON}: {error}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    with pytest.raises(ValueError, match="CUDA"):
        ms.simreg_loss(torch.randn(1, 8, 4), torch.zeros(1, 8, dtype=torch.long), impl="triton")


if __name__ == "__main__":
    print(json.dumps(_worker()))
