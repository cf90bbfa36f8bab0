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

The snippets quote production code. When the code they quote changes, the mutant fails loudly
("snippet not found"): update the snippet here so it breaks the same rule in the new code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["MUTANTS", "Mutant", "MutantError", "apply", "by_name", "copy_tree", "prepare_tree"]


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


EO = "tests/consumer/test_exactly_once.py"
CONTRACT = "tests/consumer/test_store_contract.py"
SINKS = "tests/consumer/test_sinks.py"
REPLAY = "tests/consumer/test_replay_claims.py"
WEBHOOKS = "tests/consumer/test_webhooks_intake.py"
WF_REVERIFY = "tests/consumer/test_workflow_reverify.py"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        name="new-key-on-takeover",
        rule="the same Idempotency-Key on every attempt, by any process (a take-over sends a new key)",
        file="consumer/pipeline.py",
        old="            result = await self._call(operation, envelope, key, claimed, progress)\n",
        new=(
            "            self._sent_key = key if claimed.attempts == 1 else idempotency_key(\n"
            "                self.namespace, envelope.operation, envelope.message_id, claimed.attempts\n"
            "            )\n"
            "            result = await self._call(operation, envelope, key, claimed, progress)\n"
        ),
        # Only the key sent to the provider changes; the store still sees the message's own key.
        more=(
            (
                "                envelope,\n"
                "                key,\n"
                "                documents=self.documents,\n",
                "                envelope,\n"
                "                self._sent_key,\n"
                "                documents=self.documents,\n",
            ),
        ),
        tests=(
            f"{EO}::test_crash_window_then_restart[ietf-after_provider_call-40]",
            f"{EO}::test_crash_with_many_in_flight[ietf]",
        ),
    ),
    Mutant(
        name="commit-before-record",
        rule="the committed offset never passes a message whose outcome is not recorded",
        file="consumer/offsets.py",
        old="        if self._order:\n            return self._order[0]\n",
        new="        if self._order:\n            return self._order[-1] + 1\n",
        tests=(
            f"{EO}::test_crash_window_then_restart[ietf-after_claim-40]",
            f"{EO}::test_sigterm_drains_and_never_commits_past_unrecorded",
        ),
    ),
    Mutant(
        name="skip-fingerprint-on-duplicate",
        rule="the fingerprint is checked on every path that returns a stored outcome",
        file="consumer/store/base.py",
        old=(
            "    if existing.fingerprint not in fingerprints:\n"
            "        return Decision.CONFLICT\n"
            "    if existing.state in (State.COMPLETED, State.FAILED):\n"
            "        return Decision.DONE\n"
        ),
        new=(
            "    if existing.state in (State.COMPLETED, State.FAILED):\n"
            "        return Decision.DONE\n"
            "    if existing.fingerprint not in fingerprints:\n"
            "        return Decision.CONFLICT\n"
        ),
        tests=(
            f"{CONTRACT}::test_fingerprint_mismatch_is_conflict_on_every_path[sqlite]",
            f"{EO}::test_conflicting_payload_is_not_sent_and_does_not_stall",
        ),
    ),
    Mutant(
        name="take-over-live-lease",
        rule="an IN_PROGRESS record is taken over only after its lease expired",
        file="consumer/store/base.py",
        old="    if existing.state is State.IN_PROGRESS and (existing.lease_until or 0.0) > now:\n",
        new="    if False and existing.state is State.IN_PROGRESS and (existing.lease_until or 0.0) > now:\n",
        tests=(
            f"{CONTRACT}::test_live_lease_is_not_taken_over[sqlite]",
            f"{REPLAY}::test_replay_waits_for_a_live_lease_then_skips",
        ),
    ),
    Mutant(
        name="release-foreign-lease",
        rule="only the lease owner may complete or release (a live lease released by someone else)",
        file="consumer/store/sqlite.py",
        old="\"last_error = ?, updated_at = ? WHERE key = ? AND state = 'in_progress' AND owner = ?\",\n",
        new="\"last_error = ?, updated_at = ? WHERE key = ? AND state = 'in_progress' AND ? IS NOT NULL\",\n",
        tests=(f"{CONTRACT}::test_only_owner_releases[sqlite]",),
    ),
    Mutant(
        name="drop-dlq-write",
        rule="a set-aside message is on the dead-letter topic before its offset is marked done",
        file="consumer/sinks/deadletters.py",
        old='            await self._send("dead letter", self.dlq_topic, value, msg.key, headers)\n',
        new="            pass  # mutant: the dead letter is never written\n",
        tests=(
            f"{SINKS}::test_every_dead_letter_reason_with_original_bytes_and_headers",
            f"{SINKS}::test_unwritable_dead_letter_topic_holds_the_partition",
        ),
    ),
    Mutant(
        name="resend-without-reconciliation",
        rule="without provider idempotency, a send that may repeat an attempt that acted is reconciled first",
        file="consumer/provider.py",
        old="            if reconcile is not None and reached:\n",
        new="            if False and reconcile is not None and reached:  # mutant: never reconcile\n",
        tests=(
            f"{EO}::test_crash_window_then_restart[didit-after_provider_call-40]",
            "tests/consumer/test_providers.py::test_a_retry_after_the_provider_acted_is_reconciled_not_sent_again",
        ),
    ),
)


FAILURES = "tests/consumer/test_failure_claims.py"

MUTANTS += (
    Mutant(
        name="outage-never-pauses",
        rule="a full buffer (open breaker) pauses the partitions instead of fetching on",
        file="consumer/flow.py",
        old="            self.consumer.pause(*self.consumer.assignment())\n",
        new="            pass  # mutant: the partitions are never paused\n",
        tests=(f"{FAILURES}::test_a_provider_outage_pauses_every_partition_and_resumes_after_it",),
    ),
    Mutant(
        name="reverify-skips-unfinished-generation",
        rule="re-verification reuses an unfinished generation (a new key would defeat the provider's)",
        file="consumer/tools/reverify.py",
        old="            if record.state in (State.IN_PROGRESS, State.RELEASED):\n",
        new="            if False and record.state in (State.IN_PROGRESS, State.RELEASED):\n",
        tests=(f"{REPLAY}::test_reverify_reuses_an_unfinished_generation",),
    ),
    Mutant(
        name="reverify-id-twice",
        rule="a message ID listed twice in a re-verification range is re-verified once",
        file="consumer/tools/reverify.py",
        old="        if base_key in self.seen:\n",
        new="        if False and base_key in self.seen:\n",
        tests=(f"{REPLAY}::test_an_id_listed_twice_is_reverified_once",),
    ),
    Mutant(
        name="reverify-workflow-skips-unfinished-generation",
        rule="re-verifying a workflow resumes its unfinished generation instead of opening another",
        file="consumer/tools/reverify.py",
        old="        if not resumable:\n",
        new="        if True:  # mutant: an unfinished generation is never resumed\n",
        tests=(f"{WF_REVERIFY}::test_reverify_opens_a_new_generation_of_every_workflow_step",),
    ),
    Mutant(
        name="webhook-2xx-before-ack",
        rule="a webhook is answered 2xx only after the broker acknowledged its record",
        file="consumer/webhooks/publisher.py",
        old="                metadata = await asyncio.shield(future)\n",
        new="                metadata = type('Queued', (), {'partition': -1, 'offset': -1})()\n",
        tests=(f"{WEBHOOKS}::test_2xx_only_after_the_broker_acknowledged",),
    ),
    Mutant(
        name="webhook-bad-signature-published",
        rule="a delivery whose signature does not verify never reaches Kafka",
        file="consumer/webhooks/signature.py",
        old="        if verified is None:\n",
        new="        if verified is None and payload is None:\n",
        more=(("        return verified\n", "        return verified or Verified(\"raw\", 0, payload)\n"),),
        tests=(f"{WEBHOOKS}::test_a_bad_signature_never_reaches_kafka",),
    ),
    Mutant(
        name="webhook-replay-with-fresh-header",
        rule="freshness is judged on the signed body's timestamp too, not only the unsigned header",
        file="consumer/webhooks/signature.py",
        old="            if isinstance(signed_ts, int | float) and not isinstance(signed_ts, bool):\n",
        new="            if False:\n",
        tests=(
            "tests/consumer/test_webhooks_signature.py::"
            "test_an_old_signed_body_with_a_fresh_timestamp_header_is_a_replay",
        ),
    ),
)


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
            f"mutant {mutant.name}: snippet not found in {mutant.file}; update tests/mutants.py"
        )
    if found > 1:
        raise MutantError(
            f"mutant {mutant.name}: snippet found {found} times in {mutant.file}; update tests/mutants.py"
        )
    for old, new in ((mutant.old, mutant.new), *mutant.more):
        if text.count(old) != 1:
            raise MutantError(
                f"mutant {mutant.name}: snippet found {text.count(old)} times in {mutant.file} "
                "(exactly once expected); update tests/mutants.py"
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
