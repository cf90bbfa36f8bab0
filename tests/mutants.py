"""Mutation checks: one-line breaks of a guarantee, and the tests that must notice each.

Every mutant is a text patch (file, exact old snippet, new snippet) applied to a **temporary copy** of the
tree; production code is never edited in place. The selected tests then run in the copy (its directory
first on ``PYTHONPATH`` and as the working directory, so the daemons the tests start run the mutant too).
A mutant is *killed* when its tests fail; one that survives means those tests would not notice the
guarantee breaking.

    python tests/mutants.py                 # every mutant; prints the table; exit 1 if any survives
    python tests/mutants.py new-key-on-takeover drop-dlq-write
    python tests/mutants.py --check         # only check that every snippet applies (fast; CI runs it)
    python tests/mutants.py --list

The mutants themselves are data, one ``[[mutant]]`` table each in ``tests/mutants.toml``. The snippets
quote production code. When the code they quote changes, the mutant fails loudly ("snippet not found"):
update the snippet there so it breaks the same rule in the new code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["MUTANTS", "Mutant", "MutantError", "apply", "by_name", "copy_tree", "load", "prepare_tree"]


class MutantError(Exception):
    pass


@dataclass(frozen=True)
class Mutant:
    name: str
    rule: str
    """The guarantee it breaks."""
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    """pytest node IDs (relative to the tree) that must fail on it."""
    more: tuple[tuple[str, str], ...] = ()
    """Further (old, new) patches of the same file, when one break needs two lines."""


TABLE = Path(__file__).with_name("mutants.toml")
_FIELDS = {"name", "rule", "file", "old", "new", "tests", "more"}


def load(path: Path = TABLE) -> tuple[Mutant, ...]:
    """The mutants listed in ``path`` (``[[mutant]]`` tables; the fields are described at its top)."""
    rows = tomllib.loads(path.read_text())["mutant"]
    mutants = []
    for row in rows:
        unknown = set(row) - _FIELDS
        if unknown:
            raise MutantError(f"{path.name}: mutant {row.get('name')!r} has unknown fields {sorted(unknown)}")
        mutants.append(
            Mutant(
                name=row["name"],
                rule=row["rule"],
                file=row["file"],
                old=row["old"],
                new=row["new"],
                tests=tuple(row["tests"]),
                more=tuple((patch["old"], patch["new"]) for patch in row.get("more", ())),
            )
        )
    return tuple(mutants)


MUTANTS: tuple[Mutant, ...] = load()


def by_name(name: str) -> Mutant:
    for m in MUTANTS:
        if m.name == name:
            return m
    raise MutantError(f"unknown mutant {name!r}; known: {', '.join(m.name for m in MUTANTS)}")


def apply(mutant: Mutant, root: Path) -> None:
    """Patch ``mutant.file`` under ``root``; fail loudly when the snippet is not there exactly once."""
    path = root / mutant.file
    text = path.read_text()
    found = text.count(mutant.old)
    if found == 0:
        raise MutantError(
            f"mutant {mutant.name}: snippet not found in {mutant.file}; update tests/mutants.toml"
        )
    if found > 1:
        raise MutantError(
            f"mutant {mutant.name}: snippet found {found} times in {mutant.file}; update tests/mutants.toml"
        )
    for old, new in ((mutant.old, mutant.new), *mutant.more):
        if text.count(old) != 1:
            raise MutantError(
                f"mutant {mutant.name}: snippet found {text.count(old)} times in {mutant.file} "
                "(exactly once expected); update tests/mutants.toml"
            )
        text = text.replace(old, new)
    path.write_text(text)


def copy_tree(src: Path, dst: Path) -> None:
    """The files git knows about (tracked, plus untracked not ignored), as they are in the work tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        source = src / rel
        if not source.is_file():  # deleted in the work tree
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def prepare_tree(mutant: Mutant, dst: Path, src: Path = ROOT) -> Path:
    copy_tree(src, dst)
    apply(mutant, dst)
    return dst


def check_all() -> list[str]:
    """Apply every mutant to a scratch copy of its file; return the errors (empty: all apply cleanly)."""
    errors = []
    with tempfile.TemporaryDirectory(prefix="idv-mutants-check-") as tmp:
        for m in MUTANTS:
            target = Path(tmp) / m.name / m.file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / m.file, target)
            try:
                apply(m, Path(tmp) / m.name)
                compile(target.read_text(), str(target), "exec")
            except (MutantError, SyntaxError) as exc:
                errors.append(str(exc))
    return errors


def run_mutant(mutant: Mutant, *, baseline: bool = False) -> tuple[list[str], float, str]:
    """Run the mutant's tests in a mutated copy. Returns (the tests that failed, seconds, output tail)."""
    with tempfile.TemporaryDirectory(prefix=f"idv-mutant-{mutant.name}-") as tmp:
        tree = Path(tmp)
        copy_tree(ROOT, tree)
        if not baseline:
            apply(mutant, tree)
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *mutant.tests]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
        seconds = time.monotonic() - t0
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    if proc.returncode not in (0, 1):  # 2 interrupted, 3 internal, 4 usage, 5 nothing collected
        raise MutantError(f"mutant {mutant.name}: pytest exit {proc.returncode}, not a verdict:\n{tail}")
    failed = [
        line.split()[1]
        for line in proc.stdout.splitlines()
        if line.startswith(("FAILED ", "ERROR ")) and len(line.split()) > 1 and "::" in line.split()[1]
    ]
    if proc.returncode == 1 and not failed:
        failed = ["(unparsed failure)"]
    return failed, seconds, tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--check", action="store_true", help="only check that every mutant applies")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="run the tests unmutated (they must pass)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each run's output tail")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<32} {m.file:<26} {m.rule}")
        return 0
    if args.check:
        errors = check_all()
        for e in errors:
            print(e, file=sys.stderr)
        print(f"{len(MUTANTS) - len(errors)} of {len(MUTANTS)} mutants apply cleanly")
        return 1 if errors else 0
    selected = [by_name(n) for n in args.names] if args.names else list(MUTANTS)
    rows = []
    bad = False
    for m in selected:
        failed, seconds, tail = run_mutant(m, baseline=args.baseline)
        ok = not failed if args.baseline else bool(failed)
        bad |= not ok
        short = [t.split("::", 1)[-1] for t in failed]
        rows.append((m.name, len(m.tests), short, seconds))
        if args.baseline:
            verdict = "passes" if not failed else "FAILS"
        else:
            verdict = f"killed by {len(failed)}/{len(m.tests)}" if failed else "SURVIVED"
        print(f"{m.name}: {verdict} in {seconds:.0f}s", file=sys.stderr, flush=True)
        if not ok or args.verbose:
            print(tail, file=sys.stderr)
    title = "failing (must be none)" if args.baseline else "killed by"
    print(f"\n| mutant | tests run | {title} | seconds |\n|---|---|---|---|")
    for name, n, short, seconds in rows:
        print(f"| {name} | {n} | {', '.join(short) if short else 'none'} | {seconds:.0f} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
