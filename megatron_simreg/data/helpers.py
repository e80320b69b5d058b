"""Megatron-core's compiled dataset helpers (``megatron.core.datasets.helpers_cpp``): find or build them.

GPTDataset and BlendedDataset import ``megatron.core.datasets.helpers``, which imports the pybind11 module
``helpers_cpp`` (sample index and blending index construction). The megatron-core wheels on PyPI
(0.16.1 checked) ship it prebuilt, so :func:`ensure_dataset_helpers` normally only imports it. Source
installs (a Megatron-LM checkout) do not: Megatron-LM builds it with ``make`` in that folder
(``compile_helpers()`` on rank 0), but that needs a Makefile the wheel lacks and a writable
site-packages. Here, instead, when the import fails:

1. compile ``helpers.cpp`` (shipped next to it) with the system C++ compiler and pybind11's headers into
   a cache folder (``$MEGATRON_SIMREG_HELPERS_DIR``, else ``~/.cache/megatron_simreg/helpers/<tag>``, the tag
   being the source's MD5 and the Python extension suffix, so a new megatron-core or Python rebuilds);
2. under an exclusive file lock (concurrent ranks on a node wait for one build), into a temporary file
   renamed into place (ranks on other nodes sharing the folder can only see a complete file);
3. append that folder to ``megatron.core.datasets.__path__`` so ``import megatron.core.datasets.helpers_cpp``
   finds it, in this process. Every rank calls this before building datasets.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional


def _default_build_dir(source: str) -> str:
    with open(source, "rb") as f:
        digest = hashlib.md5(f.read(), usedforsecurity=False).hexdigest()[:12]
    tag = f"{digest}{sysconfig.get_config_var('EXT_SUFFIX')}".replace(".", "_")
    root = os.environ.get("MEGATRON_SIMREG_HELPERS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_simreg", "helpers")
    return os.path.join(root, tag)


def compile_helpers(source: str, build_dir: str) -> str:
    """Compile ``source`` (Megatron's helpers.cpp) to ``build_dir/helpers_cpp<EXT_SUFFIX>``; returns its path.

    Idempotent and safe to call from many processes at once (file lock + atomic rename).
    """
    target = os.path.join(build_dir, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(target):
            return target
        try:
            import pybind11
        except ImportError:
            raise RuntimeError(
                "megatron.core.datasets.helpers_cpp is not compiled and pybind11 is missing to compile it. "
                "Fix: `pip install pybind11` (and a C++ compiler), or install a megatron-core wheel, "
                "which ships the compiled helpers.") from None
        fd, tmp = tempfile.mkstemp(dir=build_dir, suffix=".so.tmp")
        os.close(fd)
        cxx = os.environ.get("CXX", "c++")
        cmd = [cxx, "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC",
               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", source, "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"compiling Megatron's dataset helpers failed: {' '.join(cmd)}\n"
                                   f"{done.stderr[-4000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def ensure_dataset_helpers(build_dir: Optional[str] = None) -> str:
    """Make ``megatron.core.datasets.helpers_cpp`` importable (compiling it if needed); returns its file."""
    try:
        from megatron.core.datasets import helpers_cpp

        return helpers_cpp.__file__
    except ImportError:
        pass
    import megatron.core.datasets as pkg

    source = os.path.join(os.path.dirname(pkg.__file__), "helpers.cpp")
    if not os.path.isfile(source):
        raise RuntimeError(f"megatron.core.datasets.helpers_cpp is missing and so is its source {source!r}. "
                           f"Fix: reinstall megatron-core (`pip install megatron-core`).")
    build_dir = build_dir or _default_build_dir(source)
    compile_helpers(source, build_dir)
    if build_dir not in pkg.__path__:
        pkg.__path__.append(build_dir)
    importlib.invalidate_caches()
    sys.modules.pop("megatron.core.datasets.helpers_cpp", None)
    from megatron.core.datasets import helpers_cpp

    return helpers_cpp.__file__
