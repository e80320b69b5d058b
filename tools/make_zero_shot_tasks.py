#!/usr/bin/env python
"""Generate the project's local zero-shot tasks from held-out Python code (the stdlib's ``test/`` folder).

    python tools/make_zero_shot_tasks.py            # rewrites megatron_simreg/analysis/zero_shot_tasks/*.jsonl
    python tools/make_zero_shot_tasks.py --out-dir /tmp/x --stdlib /path/to/lib/python3.11

The default training corpus (megatron_simreg/data/default_corpus.py) is the stdlib *without* its
``test``/``tests`` folders, so ``<stdlib>/test`` is code of the same style the models never saw. Three
4-way multiple-choice tasks are drawn from it, ``N_EXAMPLES`` examples each:

- ``pycode_next_line``: which line comes next (semantics, local coherence);
- ``pycode_closing``: which run of closing brackets ends a line (bracket tracking, pure syntax);
- ``pycode_keyword``: which keyword fills a cloze gap (syntax; every wrong choice makes the line invalid).

Determinism: a fixed seed, files sorted by relative path and then shuffled by that seed, and one
``random.Random`` drawn in a fixed order; the same stdlib (same Python version) gives byte-identical files.
``manifest.json`` records the Python version and the files' SHA-256 so a test can check that.

Record format (one JSON object per line): ``{"id", "source": "test/x.py:LINE", "context": str,
"choices": [4 str], "answer": int}``; lm-eval scores ``log P(choice | context)`` for each choice (the YAML
sets ``target_delimiter: ""``, so the choice text follows the context verbatim).
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import io
import itertools
import json
import keyword
import math
import os
import random
import sys
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SEED = 20250101
N_EXAMPLES = 200
N_FILES = 220  # held-out files read (after the shuffle): ~3 s of tokenizing, enough candidates
MAX_FILE_BYTES = 60_000  # big files cost tokenizing time; the per-file cap would keep little of them
MAX_PER_FILE = 3  # examples per task and file (see _select: files get a second one only when needed)
MAX_LINE = 100  # characters; longer lines are neither context nor answers (keeps the jsonl small)
CONTEXT_LINES = 5  # lines of context before the answer's line (next_line) / the line with the gap (keyword)
N_CHOICES = 4
TASKS = ("pycode_next_line", "pycode_closing", "pycode_keyword")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "megatron_simreg" / "analysis" / "zero_shot_tasks"
_CLOSERS = {")": "(", "]": "[", "}": "{"}
_SKIP_TOKENS = (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
                tokenize.ENDMARKER)


@dataclass
class HeldOutFile:
    """One parsed held-out file. Rows are 1-based (``tokenize``'s), ``lines[row - 1]`` is that row's text."""
    rel: str
    lines: List[str]
    tokens_by_row: Dict[int, List[tokenize.TokenInfo]]
    logical_starts: List[int]  # rows where a logical line (statement) starts
    single_row_logical: List[int] = field(default_factory=list)  # statements that fit on their row
    opener_row: Dict[Tuple[int, int], int] = field(default_factory=dict)  # closer (row, col) -> opener row


def _clean(text: str) -> bool:
    """Printable ASCII without tabs: the same bytes under every tokenizer, JSON stays readable."""
    return text.isascii() and text.isprintable()


def heldout_files(stdlib: str) -> List[Path]:
    """``<stdlib>/test/**/*.py`` sorted by path relative to ``stdlib`` (a stable order to shuffle)."""
    root = Path(stdlib)
    return sorted((p for p in (root / "test").rglob("*.py") if p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def load_file(path: Path, stdlib: str) -> Optional[HeldOutFile]:
    """Parse one file; ``None`` when it is too big, not UTF-8 or not valid Python (test fixtures often aren't)."""
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        text = path.read_bytes().decode("utf-8")
        ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (UnicodeDecodeError, SyntaxError, ValueError, tokenize.TokenError):
        return None
    f = HeldOutFile(Path(path).relative_to(stdlib).as_posix(), text.split("\n"), collections.defaultdict(list), [])
    stack: List[Tuple[str, int]] = []
    start: Optional[int] = None
    for tok in tokens:
        f.tokens_by_row[tok.start[0]].append(tok)
        if tok.type not in _SKIP_TOKENS and start is None:
            start = tok.start[0]
            f.logical_starts.append(start)
        if tok.type == tokenize.NEWLINE and start is not None:
            if tok.start[0] == start:
                f.single_row_logical.append(start)
            start = None
        if tok.type == tokenize.OP and tok.string in ("(", "[", "{"):
            stack.append((tok.string, tok.start[0]))
        elif tok.type == tokenize.OP and tok.string in _CLOSERS:
            f.opener_row[tok.start] = stack.pop()[1]  # valid Python: the stack always matches
    return f


def read_heldout(stdlib: str, rng: random.Random) -> List[HeldOutFile]:
    """The first ``N_FILES`` usable files in a seeded shuffle of the sorted list."""
    paths = heldout_files(stdlib)
    rng.shuffle(paths)
    files = []
    for p in paths:
        f = load_file(p, stdlib)
        if f is not None:
            files.append(f)
            if len(files) == N_FILES:
                break
    return files


def _context(f: HeldOutFile, row: int, first_row: Optional[int] = None) -> Optional[str]:
    """Rows ``[first_row or row - CONTEXT_LINES, row)`` joined with newlines, ending in one; None if unusable."""
    first = row - CONTEXT_LINES if first_row is None else first_row
    if first < 1:
        return None
    lines = f.lines[first - 1:row - 1]
    if sum(1 for s in lines if s.strip()) < 2 or any(len(s) > MAX_LINE or not _clean(s) for s in lines):
        return None
    return "\n".join(lines) + "\n"


def _example(rng: random.Random, f: HeldOutFile, row: int, context: str, answer: str,
             distractors: Sequence[str]) -> dict:
    choices = [answer, *distractors]
    rng.shuffle(choices)  # the answer's position is uniform
    return {"source": f"{f.rel}:{row}", "context": context, "choices": choices, "answer": choices.index(answer)}


def _select(candidates: List[Tuple[str, dict]], rng: random.Random, cap: Optional[int]) -> List[dict]:
    """``N_EXAMPLES`` of ``(stratum, example)`` in a seeded order, at most ``cap`` per stratum, no repeated
    (context, choices). Strata cap a dominant answer (``"))"``, ``def``) so that always guessing it is no
    strategy. Passes allow 1, 2, ... ``MAX_PER_FILE`` examples per file, so the examples spread over as
    many files as have candidates before any file gets a second one."""
    rng.shuffle(candidates)
    per_stratum: Dict[str, int] = collections.Counter()
    per_file: Dict[str, int] = collections.Counter()
    seen, out = set(), []
    for limit in range(1, MAX_PER_FILE + 1):
        for stratum, ex in candidates:
            fname = ex["source"].rsplit(":", 1)[0]
            key = (ex["context"], tuple(ex["choices"]))
            if per_file[fname] >= limit or key in seen or (cap and per_stratum[stratum] >= cap):
                continue
            per_file[fname] += 1
            per_stratum[stratum] += 1
            seen.add(key)
            out.append(ex)
            if len(out) == N_EXAMPLES:
                return out
    raise RuntimeError(f"only {len(out)} of {N_EXAMPLES} examples found; raise N_FILES")


def make_next_line(files: List[HeldOutFile], rng: random.Random) -> List[dict]:
    """``pycode_next_line``: ``CONTEXT_LINES`` lines of code, then which of 4 lines is the next statement.

    The answer is a statement start (not a docstring's inside or a continuation line) of 8..90 characters,
    not a comment. The 3 distractors are statement lines from *other* held-out files with the *same
    indentation* and a similar length (within 25 %, at least +-4 characters), none occurring anywhere in the
    answer's file: indentation and length do not give the answer away, the code before it does.
    Each choice ends in a newline, so a choice that is a prefix of another is still a different line.
    """
    # (indent, stripped length) -> sorted distinct [(line, file)]: the length window is a few dict lookups
    pool: Dict[Tuple[str, int], List[Tuple[str, str]]] = collections.defaultdict(list)
    for f in files:
        for row in f.logical_starts:
            line = f.lines[row - 1].rstrip()
            body = line.lstrip()
            if 8 <= len(body) <= 90 and len(line) <= MAX_LINE and _clean(line) and not body.startswith("#"):
                pool[line[:len(line) - len(body)], len(body)].append((line, f.rel))
    for key in pool:
        pool[key] = sorted(set(pool[key]))
    candidates = []
    for f in files:
        own = {s.rstrip() for s in f.lines}
        for row in rng.sample(f.logical_starts, min(len(f.logical_starts), 6)):
            line = f.lines[row - 1].rstrip()
            body = line.lstrip()
            if not (8 <= len(body) <= 90) or body.startswith("#") or len(line) > MAX_LINE or not _clean(line):
                continue
            context = _context(f, row)
            if context is None:
                continue
            indent, tol = line[:len(line) - len(body)], max(4, len(body) // 4)
            near = sorted({cand for n in range(len(body) - tol, len(body) + tol + 1)
                           for cand, rel in pool.get((indent, n), ()) if rel != f.rel and cand not in own})
            if len(near) < N_CHOICES - 1:
                continue
            distractors = [d + "\n" for d in rng.sample(near, N_CHOICES - 1)]
            candidates.append(("all", _example(rng, f, row, context, line + "\n", distractors)))
    return _select(candidates, rng, cap=None)


def make_closing(files: List[HeldOutFile], rng: random.Random) -> List[dict]:
    """``pycode_closing``: a line cut before its final run of 2..4 closing brackets; which run closes it.

    The run's openers all lie inside the context shown (the 3 lines before the cut line, or more, up to 12,
    when an opener is further up), so the answer follows from the context alone. The 3 distractors are
    other runs of the *same length* over ``)]}``; any other run closes some bracket with the wrong kind, a
    syntax error, so exactly one choice is valid Python. The run may be followed by ``:`` or ``,`` (kept in
    every choice). At most 15 % of the examples share one run (``))`` is ~60 % of all runs).
    """
    candidates = []
    for f in files:
        for row in sorted(f.tokens_by_row):
            toks = [t for t in f.tokens_by_row[row] if t.type not in _SKIP_TOKENS]
            tail = ""
            if toks and toks[-1].type == tokenize.OP and toks[-1].string in (":", ","):
                tail = toks.pop().string
            n = 0
            while n < len(toks) and toks[-1 - n].type == tokenize.OP and toks[-1 - n].string in _CLOSERS:
                n += 1
            if n < 2 or n > 4 or len(toks) == n:
                continue
            run_toks = toks[-n:]
            if any(a.end != b.start for a, b in zip(run_toks, run_toks[1:])):  # "a) )" is not one run
                continue
            line = f.lines[row - 1]
            col = run_toks[0].start[1]
            run = line[col:col + n]
            if line[col + n:].rstrip() != tail or len(line) > MAX_LINE or not _clean(line):
                continue  # something (a comment) after the run: the choice would have to carry it
            first = min([row - 3] + [f.opener_row[t.start] for t in run_toks])
            if row - first > 12:
                continue
            context = _context(f, row, first)
            if context is None:
                continue
            context += line[:col]
            others = ["".join(p) for p in itertools.product(")]}", repeat=n) if "".join(p) != run]
            distractors = [o + tail + "\n" for o in rng.sample(others, N_CHOICES - 1)]
            candidates.append((run, _example(rng, f, row, context, run + tail + "\n", distractors)))
    return _select(candidates, rng, cap=int(0.15 * N_EXAMPLES))


def _parses_alone(statement: str) -> bool:
    """Whether one dedented statement line is valid Python on its own (a block header gets ``pass``)."""
    src = statement.strip()
    if src.endswith(":"):
        src += " pass"
    try:
        ast.parse(src)
    except (SyntaxError, ValueError):
        return False
    return True


def make_keyword(files: List[HeldOutFile], rng: random.Random) -> List[dict]:
    """``pycode_keyword``: a one-line statement cut before one of its keywords; which keyword fills the gap.

    Each choice is ``keyword + rest of the line``, so both sides of the gap count. Only statements that are
    valid Python on their own are used, and a distractor keyword is kept only if putting it in the gap makes
    the statement invalid (``ast.parse`` fails): the task is syntax, not a guess between valid variants
    (``if``/``while``). Distractors are drawn with weight sqrt(keyword frequency in the held-out files), so
    rare keywords (``nonlocal``) are not easy rejects; at most 10 % of the examples share one answer.
    """
    freq = collections.Counter(t.string for f in files for toks in f.tokens_by_row.values() for t in toks
                               if t.type == tokenize.NAME and keyword.iskeyword(t.string))
    vocab = sorted(freq)
    candidates = []
    for f in files:
        for row in rng.sample(f.single_row_logical, min(len(f.single_row_logical), 8)):
            line = f.lines[row - 1]
            kws = [t for t in f.tokens_by_row[row] if t.type == tokenize.NAME and keyword.iskeyword(t.string)]
            if not kws or len(line) > MAX_LINE or not _clean(line) or not _parses_alone(line):
                continue
            tok = rng.choice(kws)
            col, word = tok.start[1], tok.string
            rest = line[col + len(word):]
            context = _context(f, row)
            if context is None:
                continue
            # A weighted random order of the other keywords (Efraimidis-Spirakis keys), then the first 3 that
            # break the statement: a weighted draw without replacement that parses ~5 variants, not ~35.
            order = sorted((k for k in vocab if k != word), key=lambda k: -rng.random() ** (1 / math.sqrt(freq[k])))
            distractors = []
            for k in order:
                if not _parses_alone(line[:col] + k + rest):
                    distractors.append(k + rest + "\n")
                    if len(distractors) == N_CHOICES - 1:
                        break
            else:
                continue
            ex = _example(rng, f, row, context + line[:col], word + rest + "\n", distractors)
            candidates.append((word, ex))
    return _select(candidates, rng, cap=int(0.10 * N_EXAMPLES))


MAKERS = {"pycode_next_line": make_next_line, "pycode_closing": make_closing, "pycode_keyword": make_keyword}


def generate(out_dir: str, stdlib: Optional[str] = None) -> Dict[str, str]:
    """Write ``<task>.jsonl`` for every task and ``manifest.json`` into ``out_dir``; returns task -> path."""
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    rng = random.Random(SEED)
    files = read_heldout(stdlib, rng)
    os.makedirs(out_dir, exist_ok=True)
    written, digests = {}, {}
    for task in TASKS:
        examples = MAKERS[task](files, rng)
        path = os.path.join(out_dir, f"{task}.jsonl")
        data = "".join(json.dumps({"id": f"{task}-{i:04d}", **ex}) + "\n" for i, ex in enumerate(examples))
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(data)
        written[task] = path
        digests[f"{task}.jsonl"] = hashlib.sha256(data.encode()).hexdigest()
    manifest = {"generator": "tools/make_zero_shot_tasks.py", "python": sys.version.split()[0], "seed": SEED,
                "examples_per_task": N_EXAMPLES, "heldout_files_read": len(files), "sha256": digests}
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(DEFAULT_OUT), help="where the jsonl files go (default: the package)")
    p.add_argument("--stdlib", default=None, help="stdlib folder holding test/ (default: this Python's)")
    args = p.parse_args(argv)
    for task, path in generate(args.out_dir, args.stdlib).items():
        print(f"{task}: {path} ({os.path.getsize(path)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
