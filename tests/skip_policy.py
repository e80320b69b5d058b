"""No silent skips: a run fails when a test is skipped for a reason outside tests/expected_skips.txt.

Loaded by tests/conftest.py (its hooks are imported there). Each skip, of a test (setup or call) or of a whole
module at collection, is matched against the allow-list; at the end the unexpected ones are printed with their
reasons and the exit status becomes 1 (also when nothing ran: exit 5 stays a failure).

Under pytest-xdist the workers' reports reach the controller, which runs ``pytest_runtest_logreport`` for every test
report and ``pytest_collectreport`` for every skipped or failed collection; the workers themselves decide nothing.

The allow-list (``MEGATRON_SIMREG_EXPECTED_SKIPS`` names another file): one entry per line,
``<scope> <regex>  # why``, where scope is ``always`` (accepted everywhere) or ``local`` (accepted only when the
environment variable ``CI`` is unset or false: a CI run has root, a CPU and the packages tools/setup_env.sh installs).
The regex is searched in the skip reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ALLOW_LIST = Path(__file__).with_name("expected_skips.txt")
SCOPES = ("always", "local")

_skips: Dict[str, List[str]] = {}  # reason -> node ids skipped for it


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def load_allow_list(path: Path | None = None) -> List[Tuple[str, "re.Pattern[str]", str]]:
    """``[(scope, pattern, why)]``; a malformed line raises (a typo must not allow everything)."""
    path = Path(path or os.environ.get("MEGATRON_SIMREG_EXPECTED_SKIPS") or ALLOW_LIST)
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        body, sep, why = line.partition("  # ")
        scope, _, pattern = body.strip().partition(" ")
        if scope not in SCOPES or not pattern.strip() or not sep or not why.strip():
            raise ValueError(f"{path}:{n}: expected '<always|local> <regex>  # why', got {line!r}")
        entries.append((scope, re.compile(pattern.strip()), why.strip()))
    return entries


def skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, (tuple, list)) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        message = str(longrepr[2])
    else:
        message = str(longrepr)
    return message[len("Skipped: "):] if message.startswith("Skipped: ") else message


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # an xdist worker: the controller sees its reports and decides


def _note(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is reported as skipped too
        _skips.setdefault(skip_reason(report), []).append(report.nodeid)


def pytest_runtest_logreport(report):
    _note(report)


def pytest_collectreport(report):
    _note(report)


def unexpected_skips(config) -> Dict[str, List[str]]:
    if _is_worker(config) or config.option.collectonly:
        return {}
    scopes = ("always",) if on_ci() else SCOPES
    allowed = [pattern for scope, pattern, _ in load_allow_list() if scope in scopes]
    return {reason: ids for reason, ids in _skips.items() if not any(p.search(reason) for p in allowed)}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if unexpected_skips(session.config) and session.exitstatus in (pytest.ExitCode.OK,
                                                                    pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = unexpected_skips(config)
    if not bad:
        return
    where = "on CI (CI is set)" if on_ci() else "here"
    terminalreporter.section("unexpected skips", sep="=", red=True, bold=True)
    terminalreporter.line(f"skips not allowed {where} by {os.path.relpath(ALLOW_LIST)} (or MEGATRON_SIMREG_EXPECTED_"
                          "SKIPS): the run fails", red=True)
    for reason, ids in sorted(bad.items()):
        terminalreporter.line(f"UNEXPECTED SKIP ({len(ids)}): {reason}", red=True)
        for nodeid in ids[:5]:
            terminalreporter.line(f"    {nodeid}")
        if len(ids) > 5:
            terminalreporter.line(f"    ... and {len(ids) - 5} more")
