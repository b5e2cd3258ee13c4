"""Mutation testing for one source file: would the tests notice if it broke?

    python benchmarks/mutation.py broker/storage/segment.py
    python benchmarks/mutation.py client/protocol/_batch.py --sample 40 --seed 1
    python benchmarks/mutation.py FILE --tests tests/test_x.py tests/test_y.py --timeout 120
    python benchmarks/mutation.py FILE --list        # the mutants, without running anything

Each mutant is one small change to the file's syntax tree (a comparison
flipped, an integer or a slice bound off by one, ``and``/``or`` swapped, an
operand of ``and``/``or`` dropped, a ``not`` dropped, a call / ``raise`` / ``break`` / ``continue`` / augmented
assignment removed, a returned value replaced by ``None``). It is written
into the file itself, so that everything the tests start (``pybroker serve``
subprocesses included) runs it; the tests that cover the file then run with
``-x``, a fixed Hypothesis seed, no Hypothesis database and a timeout. A
mutant is *killed* when they fail, *timed out* when they hang (counted as
killed: a test noticed), *survived* when they pass.

Mutating in place rather than in a copy of the tree: the editable install
maps ``pybroker`` onto this tree, and subprocess brokers import it from
there, so a copy would need its own install. The file is protected instead:
the runner refuses to start if it has uncommitted changes (so ``git checkout
FILE`` is always a way back) or if a backup from an earlier run is lying
around, keeps a backup next to it while running, restores it in a
``finally`` (on SIGINT, SIGTERM and SIGHUP too) and checks the restored
bytes. Do not edit the file, or run the tests of this tree for anything
else, while the runner works: run it in a worktree of its own.

Slow (a full test run per surviving mutant) and so not part of CI; see
benchmarks/README.md for the scores and for the survivors that are
equivalent (cannot be told apart from the original by any test).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
BACKUP_SUFFIX = ".mutation-backup"
NO_MUTATE = "# pragma: no mutate"

#: The tests that cover each file, fastest first (a mutant is usually
#: killed by the first of them; a survivor pays for all). Files not listed
#: get every test module that names the file's package.
COVERING_TESTS: dict[str, list[str]] = {
    "broker/storage/segment.py": [
        "tests/test_segment_edges.py",
        "tests/test_index_recovery.py",
        "tests/test_log_file.py",
        "tests/test_log_damage.py",
        "tests/test_storage_faults.py",
        "tests/test_durability.py",
    ],
    "broker/storage/scan.py": [
        "tests/test_segment_edges.py",
        "tests/test_index_recovery.py",
        "tests/test_log_file.py",
        "tests/test_log_damage.py",
        "tests/test_durability.py",
    ],
    "broker/storage/recovery.py": [
        "tests/test_segment_edges.py",
        "tests/test_index_recovery.py",
        "tests/test_log_file.py",
        "tests/test_log_damage.py",
        "tests/test_storage_faults.py",
        "tests/test_durability.py",
    ],
    "broker/storage/groupjournal.py": [
        "tests/test_journal_edges.py",
        "tests/test_group_state.py",
        "tests/test_group_durability.py",
    ],
    "broker/storage/groupstate.py": [
        "tests/test_journal_edges.py",
        "tests/test_group_state.py",
        "tests/test_group_durability.py",
    ],
    "broker/committer.py": [
        "tests/test_committer_edges.py",
        "tests/test_ack_after_sync.py",
        "tests/test_storage_faults.py",
        "tests/test_durability.py",
    ],
    "client/protocol/_batch.py": [
        "tests/test_batch_edges.py",
        "tests/test_batch.py",
        "tests/test_codec.py",
        "tests/test_vectors.py",
        "tests/test_fuzz_codec.py",
        "tests/test_group_state.py",
    ],
    "client/protocol/_readers.py": [
        "tests/test_frame_edges.py",
        "tests/test_codec.py",
        "tests/test_frame_peek.py",
        "tests/test_vectors.py",
        "tests/test_fuzz_codec.py",
    ],
}

_FLIP: dict[type[ast.cmpop], list[type[ast.cmpop]]] = {
    ast.Lt: [ast.LtE, ast.Gt],
    ast.LtE: [ast.Lt, ast.Gt],
    ast.Gt: [ast.GtE, ast.Lt],
    ast.GtE: [ast.Gt, ast.Lt],
    ast.Eq: [ast.NotEq],
    ast.NotEq: [ast.Eq],
    ast.In: [ast.NotIn],
    ast.NotIn: [ast.In],
    ast.Is: [ast.IsNot],
    ast.IsNot: [ast.Is],
}
_ARITH: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.LShift: ast.RShift,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
}


@dataclass(frozen=True)
class Mutant:
    line: int
    col: int
    kind: str
    original: str  # the source text replaced
    replacement: str
    start: int  # character span in the file's text
    end: int

    @property
    def label(self) -> str:
        return f"line {self.line}: {self.kind}: `{_short(self.original)}` -> `{_short(self.replacement)}`"

    def apply(self, text: str) -> str:
        return text[: self.start] + self.replacement + text[self.end :]


def _short(s: str, n: int = 70) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


# -- generating mutants -------------------------------------------------------


class _Sites(ast.NodeVisitor):
    """Collect (node, replacement node or source) pairs, skipping what is
    not behaviour: docstrings, annotations, ``__all__``, ``TYPE_CHECKING``
    blocks, lines marked ``# pragma: no mutate``."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.found: list[tuple[ast.AST, str, str]] = []  # (node, kind, replacement source)

    def _skip(self, node: ast.AST) -> bool:
        line = getattr(node, "lineno", None)
        return line is None or NO_MUTATE in self.lines[line - 1]

    def add(self, node: ast.AST, kind: str, new: ast.AST | str) -> None:
        if self._skip(node):
            return
        src = new if isinstance(new, str) else ast.unparse(new)
        self.found.append((node, kind, src))

    # Parts of the tree that are not run-time behaviour.
    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        return

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        self._body(node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._body(node.body)

    def visit_Module(self, node: ast.Module) -> None:
        self._body(node.body)

    def _body(self, body: list[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # docstring
            self.visit(stmt)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        return

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        return

    # Mutation operators.
    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            for new_op in _FLIP.get(type(op), []):
                new = copy.deepcopy(node)
                new.ops[i] = new_op()
                self.add(node, "comparison", new)
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self.add(node, "and/or", new)
        # Each operand dropped: a check that is never made.
        for i in range(len(node.values)):
            rest = [copy.deepcopy(v) for j, v in enumerate(node.values) if j != i]
            self.add(node, "operand removed", rest[0] if len(rest) == 1 else ast.BoolOp(node.op, rest))
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self.add(node, "not removed", node.operand)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        new_op = _ARITH.get(type(node.op))
        if new_op is not None:
            new = copy.deepcopy(node)
            new.op = new_op()
            self.add(node, "arithmetic", new)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self.add(node, "boolean", ast.Constant(not value))
        elif isinstance(value, int):
            self.add(node, "off by one", ast.Constant(value + 1))
            if value > 0:
                self.add(node, "off by one", ast.Constant(value - 1))

    def visit_Slice(self, node: ast.Slice) -> None:
        for part in ("lower", "upper"):
            bound = getattr(node, part)
            if bound is None or isinstance(bound, ast.Constant):
                continue  # constants get their own off-by-one mutants
            for op, sign in ((ast.Add(), "+"), (ast.Sub(), "-")):
                self.add(bound, f"slice {part} bound {sign} 1", ast.BinOp(copy.deepcopy(bound), op, ast.Constant(1)))
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self.add(node.value, "return value", "None")
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, (ast.Call, ast.Await)):
            self.add(node, "statement removed", "pass")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.add(node, "statement removed", "pass")
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        self.add(node, "statement removed", "pass")
        self.generic_visit(node)

    def visit_Break(self, node: ast.Break) -> None:
        self.add(node, "statement removed", "pass")

    def visit_Continue(self, node: ast.Continue) -> None:
        self.add(node, "statement removed", "pass")


def _offsets(text: str) -> list[int]:
    """Character offset of the start of each line (1-based line numbers)."""
    starts = [0, 0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def mutants_of(text: str) -> list[Mutant]:
    tree = ast.parse(text)
    lines = text.splitlines()
    sites = _Sites(lines)
    sites.visit(tree)
    starts = _offsets(text)
    out: list[Mutant] = []
    seen: set[str] = set()
    for node, kind, replacement in sites.found:
        # ast columns are UTF-8 byte offsets: convert through the line's bytes.
        def char_at(line: int, byte_col: int) -> int:
            return starts[line] + len(lines[line - 1].encode("utf-8")[:byte_col].decode("utf-8"))

        start = char_at(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = char_at(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        original = text[start:end]
        if isinstance(node, ast.expr) and not isinstance(node, ast.Constant):
            replacement = f"({replacement})"  # keep precedence where it is spliced in
        if replacement.strip("()") == original:
            continue
        m = Mutant(node.lineno, node.col_offset, kind, original, replacement, start, end)  # type: ignore[attr-defined]
        new_text = m.apply(text)
        if new_text in seen:
            continue
        try:
            compile(new_text, "<mutant>", "exec")
        except SyntaxError:
            continue
        seen.add(new_text)
        out.append(m)
    return out


# -- running --------------------------------------------------------------------


@dataclass
class Result:
    mutant: str
    line: int
    kind: str
    original: str
    replacement: str
    outcome: str  # killed, survived, timeout
    seconds: float
    failed_test: str = ""


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _pycs(path: Path) -> Iterator[Path]:
    cache = path.parent / "__pycache__"
    if cache.is_dir():
        yield from cache.glob(f"{path.stem}.*.pyc")


def _git_clean(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(rel)], cwd=ROOT, capture_output=True)
    if tracked.returncode != 0:
        return False
    diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", str(rel)], cwd=ROOT)
    return diff.returncode == 0


def run_tests(tests: list[str], seed: int, timeout: float, plugin_dir: Path) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, first failing test)."""
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a stale .pyc of another mutant must never run
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_dir), env.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "pytest", "-x", "-q", "--no-header", "-p", "no:cacheprovider",
        "-p", "_mutation_profile", f"--hypothesis-seed={seed}", *tests,
    ]
    started = time.monotonic()
    # A session of its own, so that a timeout kills the brokers the tests started too.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - started, ""
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything the tests left running
    except ProcessLookupError:
        pass
    seconds = time.monotonic() - started
    if proc.returncode == 0:
        return "passed", seconds, ""
    failed = ""
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            failed = line.split(" ", 1)[1].split(" - ")[0]
            break
    if not failed:
        failed = f"exit status {proc.returncode}"
    return "failed", seconds, failed


_PROFILE = '''\
"""Loaded by benchmarks/mutation.py: no example database, so that every
mutant sees the same examples (--hypothesis-seed fixes the rest)."""
from hypothesis import settings

settings.register_profile("mutation", database=None, print_blob=False)
settings.load_profile("mutation")
'''


def default_tests(rel: str) -> list[str]:
    if rel in COVERING_TESTS:
        return [t for t in COVERING_TESTS[rel] if (ROOT / t).exists()]
    parts = Path(rel).with_suffix("").parts
    top = {"client": ["pybroker"], "broker": ["pybroker", "server"]}[parts[0]]
    package = ".".join(top + list(parts[1:-1]))
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if package in p.read_text("utf-8")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="source file to mutate, relative to the repository (e.g. broker/storage/segment.py)")
    parser.add_argument("--tests", nargs="+", help="test files to run (default: those listed for the file)")
    parser.add_argument("--sample", type=int, help="run this many mutants, drawn with --seed")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed and Hypothesis seed (default 0)")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 3 x the clean run + 30)")
    parser.add_argument("--lines", help="only mutants on these lines, e.g. 120-180")
    parser.add_argument("--only", nargs="+", type=int, help="only the mutants with these numbers (from --list)")
    parser.add_argument(
        "--rerun", type=Path, help="run the mutants of an earlier --json result again (same line and change)"
    )
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="with --rerun: only the mutants that survived it (tests were added; a killed one stays killed)",
    )
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--json", type=Path, help="write every result to this file")
    args = parser.parse_args(argv)

    path = (ROOT / args.file).resolve()
    rel = str(path.relative_to(ROOT))
    text = path.read_text("utf-8")
    mutants = mutants_of(text)
    numbered = list(enumerate(mutants, 1))
    if args.lines:
        lo, _, hi = args.lines.partition("-")
        numbered = [(n, m) for n, m in numbered if int(lo) <= m.line <= int(hi or lo)]
    if args.only:
        numbered = [(n, m) for n, m in numbered if n in set(args.only)]
    if args.rerun:
        earlier = json.loads(args.rerun.read_text("utf-8"))["results"]
        if args.survivors:
            earlier = [r for r in earlier if r["outcome"] == "survived"]
        wanted = {(r["line"], r["kind"], r["original"], r["replacement"]) for r in earlier}
        numbered = [(n, m) for n, m in numbered if (m.line, m.kind, m.original, m.replacement) in wanted]
        if len(numbered) != len(wanted):
            print(f"{len(wanted) - len(numbered)} mutants of {args.rerun} are not in the file any more", file=sys.stderr)
    total = len(numbered)
    if args.sample is not None and args.sample < len(numbered):
        numbered = sorted(random.Random(args.seed).sample(numbered, args.sample), key=lambda nm: nm[0])
    if args.list:
        for n, m in numbered:
            print(f"#{n:<4} {m.label}")
        print(f"{len(numbered)} of {total} mutants")
        return 0

    tests = args.tests or default_tests(rel)
    if not tests:
        print(f"no tests found for {rel}; name them with --tests", file=sys.stderr)
        return 2
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if backup.exists():
        print(f"{backup} exists: an earlier run did not finish; compare it with {rel}, restore, delete it", file=sys.stderr)
        return 2
    if not _git_clean(path):
        print(f"{rel} has uncommitted changes (or is not tracked): commit them first, the runner writes into it", file=sys.stderr)
        return 2

    import tempfile

    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        plugin_dir = Path(tmp)
        (plugin_dir / "_mutation_profile.py").write_text(_PROFILE, "utf-8")
        print(f"{rel}: {len(numbered)} of {total} mutants; tests: {' '.join(tests)}", flush=True)
        status, clean_seconds, failed = run_tests(tests, args.seed, 3600, plugin_dir)
        if status != "passed":
            print(f"the tests do not pass on the unmutated file ({status}: {failed}); nothing to measure", file=sys.stderr)
            return 2
        timeout = args.timeout or 3 * clean_seconds + 30
        print(f"clean run: {clean_seconds:.1f} s; timeout per mutant {timeout:.0f} s", flush=True)

        original = path.read_bytes()
        backup.write_bytes(original)
        results: list[Result] = []
        handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            for i, (n, m) in enumerate(numbered, 1):
                for pyc in _pycs(path):
                    pyc.unlink()
                path.write_text(m.apply(text), "utf-8")
                status, seconds, failed = run_tests(tests, args.seed, timeout, plugin_dir)
                outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
                results.append(Result(f"#{n}", m.line, m.kind, m.original, m.replacement, outcome, round(seconds, 1), failed))
                print(f"[{i}/{len(numbered)}] {outcome.upper():8} #{n} {m.label} ({seconds:.0f} s{'; ' + failed if failed else ''})", flush=True)
        except (KeyboardInterrupt, _Interrupted) as exc:
            print(f"interrupted ({exc or 'SIGINT'}): restoring {rel}", file=sys.stderr)
        finally:
            path.write_bytes(original)
            for pyc in _pycs(path):
                pyc.unlink()
            for s, h in handlers.items():
                signal.signal(s, h)
            if path.read_bytes() == original:
                backup.unlink()
            else:
                print(f"could not restore {rel}: the original is in {backup}", file=sys.stderr)

    report(rel, results, total, args.json)
    return 0


def report(rel: str, results: list[Result], total: int, json_path: Path | None) -> None:
    killed = sum(r.outcome == "killed" for r in results)
    timeouts = sum(r.outcome == "timeout" for r in results)
    survivors = [r for r in results if r.outcome == "survived"]
    n = len(results)
    score = 100 * (killed + timeouts) / n if n else 0.0
    print()
    print(f"{rel}: {n} mutants run (of {total}): {killed} killed, {timeouts} timed out, {len(survivors)} survived")
    print(f"score: {score:.1f} % ({killed + timeouts} of {n} detected)")
    if survivors:
        print("survivors:")
        for r in survivors:
            print(f"  {r.mutant:>5} {rel}:{r.line} {r.kind}: `{_short(r.original)}` -> `{_short(r.replacement)}`")
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {"file": rel, "total": total, "score": round(score, 1), "results": [asdict(r) for r in results]},
                indent=1,
            )
            + "\n",
            "utf-8",
        )


if __name__ == "__main__":
    sys.exit(main())
