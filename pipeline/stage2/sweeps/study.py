"""The Optuna study behind every sweep: its storage, its definition, and which trial runs which (configuration, seed).

The run is the unit of the queue. Each trial of a sweep's study is one run, named ``<config-slug>-seed<N>`` in
its ``run`` user attribute, with the results (dev/test metrics, best epoch, run dir, host, wall time, error)
stored beside it. Every run a plan knows of is queued up front (``requeue``: ``enqueue_trial`` with the run's
name in the new trial's user attributes), so a trial holds its run from the instant it exists and no fault at
any instant leaves a run that no trial holds. The only trials made by a sampler are a search's draws: a draw
holds nothing until it has chosen its configuration, and a draw that dies before that is simply drawn again.
The study is both the work queue and the record that ``sppscl sweep summary`` reads.

What a rerun does: every run of the plan that is neither finished nor held by a live trial (failed, interrupted,
never queued, or, locally, whose run directory lost its results.json) is queued again, all at once (``requeue``
with ``include_failed``). While a command runs, only runs whose trial died without a recorded outcome (a lost
machine failed by the heartbeat check) are queued again; a run that failed with an error waits for the next
command, so a run that always fails is not retried forever.

Storage: without ``--storage``, a journal file ``<sweep dir>/study.log`` (Optuna's ``JournalFileBackend``). Its
operations are appended under a file lock and replayed in one order by every process, so the worker processes
of a sweep share it safely, popping a queued trial is atomic, and no server is needed. SQLite is not used: Optuna
warns it off for concurrent writers, and its trial-queue pop is not atomic there. With ``--storage URL``
(PostgreSQL), Optuna's ``RDBStorage`` with heartbeats: a trial whose worker stopped beating for
``GRACE_BEATS`` heartbeats (machine lost, ``kill -9``) is failed by any live worker's heartbeat check, and
its run queued again by ``requeue``. Every "is that worker dead?" question on a shared study is answered by
that one check, never by a separate timer.

Exactly once: two machines may queue the same run (both saw it missing), and a search may draw one
configuration twice. Trial numbers are given by the storage in creation order, so ``claim`` lets the
lowest-numbered live trial of a run train it and every other one step aside (state PRUNED, ``duplicate_of``).
The run directory itself has one owner at a time across every process and command (``stage2/ownership.py``).
A run stopped early by a search's pruner is PRUNED too, but with its result (``status: pruned``, ``is_pruned``):
it is finished, as a completed run is.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ...cache import diff_provenance
from ...errors import masked_url
from .spec import SweepError, config_slug, run_name

LOCAL_STUDY_FILE = "study.log"
DEFAULT_HEARTBEAT = 10  # seconds between a running trial's heartbeats (--storage only)
GRACE_BEATS = 4  # a trial whose worker missed this many heartbeats is failed and its run queued again
# Local sweeps have no heartbeat: a search draw still choosing its configuration after this long belongs to a
# worker that died (the parent fails a dead worker's announced trials by pid; this covers a draw not yet announced).
LOCAL_UNDECIDED_GRACE = 30.0
META_KEY = "sppscl"

optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by the sweep itself, with their errors


class StorageLost(SweepError):
    """The shared study's database stopped answering during a sweep: the run was tried and failed (exit 1)."""

    exit_code = 1


masked = masked_url


def scrub(text: str, url: str | None) -> str:
    """``text`` (a driver's or SQLAlchemy's message) with the storage URL masked and its password, wherever it
    appears, replaced by ``***``."""
    if not url:
        return text
    from sqlalchemy.engine import make_url

    text = text.replace(url, masked(url))
    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 - an unparseable URL has no password to find
        password = None
    return text.replace(str(password), "***") if password else text


def database_error(e: BaseException) -> bool:
    """Whether ``e`` comes from the study's database (server gone, connection refused or reset, a failed commit)."""
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(e, (SQLAlchemyError, optuna.exceptions.StorageInternalError))


def storage_lost(url: str, e: BaseException) -> StorageLost:
    """The one line for a lost study database: which storage (masked), the driver's first line, what to do."""
    cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None else e
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return StorageLost(
        f"lost the study database {masked(url)} ({type(cause).__name__}: {scrub(first, url)[:300]}). Finished runs are "
        "kept in it; once the database answers again, rerun the same command on every machine to continue the sweep"
    )


def open_storage(url: str | None, out: Path, heartbeat: int = DEFAULT_HEARTBEAT) -> optuna.storages.BaseStorage:
    """``url`` None: the journal file in ``out``; otherwise an RDB storage with heartbeats and stale-trial retries."""
    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        out.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(out / LOCAL_STUDY_FILE)))
    if heartbeat < 1:
        raise SweepError(f"--heartbeat must be at least 1 second, got {heartbeat}")
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: experimental since 2.9, used as documented
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat,
                    grace_period=GRACE_BEATS * heartbeat,
                    # no retry callback: `requeue` queues the run of a failed trial again (with its name), one mechanism for every retry
                )
        except ModuleNotFoundError as e:
            raise SweepError(f"--storage {masked(url)}: the database driver is not installed ({e}); for PostgreSQL: pip install 'sppscl[postgres]'") from None
        except Exception as e:  # sqlalchemy's errors: the server, the user or the database is wrong
            from sqlalchemy.exc import IntegrityError

            if isinstance(e, IntegrityError) and attempt < 4:
                # machines starting at once on a new database all create Optuna's tables; the losers see them on retry
                time.sleep(0.5 + random.random())
                continue
            first = (str(e).strip().splitlines() or [""])[0]
            raise SweepError(
                f"--storage {masked(url)}: cannot open the study storage: {type(e).__name__}: {scrub(first, url)[:300]}. Check that the "
                "server runs and the user, password (in the URL, or PGPASSWORD / ~/.pgpass for PostgreSQL) and database are right"
            ) from None


def open_study(storage, name: str, meta: dict, where: str) -> optuna.Study:
    """Create or join the study ``name``; its recorded definition ``meta`` must equal this sweep's (a clear error otherwise)."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    stored = study.user_attrs.get(META_KEY)
    if stored is None:
        study.set_user_attr(META_KEY, meta)
        # two first-comers may both have found it empty: whichever wrote last is the study's definition
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs[META_KEY]
    stored, ours = json.loads(json.dumps(stored)), json.loads(json.dumps(meta))
    if stored != ours:
        what = "space" if stored.get("kind") == ours.get("kind") == "search" else "definition"
        raise SweepError(
            f"{where} holds a study with another {what}:\n  "
            + "\n  ".join(diff_provenance(stored, ours, names=("the stored study", "this command")))
            + "\nrun the same sweep (same --grid/--space, --seeds, base configuration and cache) to continue it, or use another study"
        )
    return study


def load_meta(storage, name: str, where: str) -> tuple[optuna.Study, dict]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage)) or "none"
        raise SweepError(f"{where} has no study named {name!r} (studies there: {names})") from None
    if META_KEY not in study.user_attrs:
        raise SweepError(f"{where}: study {name!r} was not made by `sppscl sweep`")
    return study, study.user_attrs[META_KEY]


# ------------------------------------------------------------------------------------ trials as runs


def all_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False)


# A run's results (status, metrics, best epoch, wall time, error, where it ran) are stored on its trial as this one
# attribute: one write, where one attribute per field took about 20 round trips to a shared study's database.
RESULT_KEY = "result"


def attrs(t: FrozenTrial) -> dict[str, Any]:
    """A trial's user attributes with its results among them, whether stored as the one ``result`` attribute or, by
    sweeps of older versions, as one attribute per field."""
    result = t.user_attrs.get(RESULT_KEY)
    return {**t.user_attrs, **result} if isinstance(result, dict) else t.user_attrs


def has_result(t: FrozenTrial) -> bool:
    """Whether the trial's run recorded an outcome (a status: ok, pruned, or failed with its error)."""
    return "status" in attrs(t)


def is_queued(t: FrozenTrial) -> bool:
    """A trial created with its run already fixed (queued by ``requeue``), not by the sampler."""
    return "fixed_params" in t.system_attrs or "failed_trial" in t.system_attrs


def by_run(trials: list[FrozenTrial]) -> dict[str, list[FrozenTrial]]:
    out: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        if "run" in t.user_attrs:
            out.setdefault(t.user_attrs["run"], []).append(t)
    return out


def is_pruned(t: FrozenTrial) -> bool:
    """A run stopped early by the search's pruner (``--prune``): finished, never retried, in no mean. Not the trials
    that step aside for another (``duplicate_of``, ``surplus``): Optuna marks those PRUNED too, with no result."""
    return t.state == TrialState.PRUNED and attrs(t).get("status") == "pruned"


def is_done(t: FrozenTrial, local: bool) -> bool:
    """A finished run (trained to its end, or pruned). In a local sweep the run directory is the artifact: a run
    whose results.json was deleted is redone."""
    if t.state != TrialState.COMPLETE and not is_pruned(t):
        return False
    return not local or (Path(attrs(t).get("run_dir", "")) / "results.json").exists()


def outcome(trials: list[FrozenTrial], local: bool) -> FrozenTrial | None:
    """The trial that is a run's result: its newest finished success (or pruned run), else its newest failure; None
    while it has neither."""
    done = [t for t in trials if is_done(t, local)]
    if done:
        return max(done, key=lambda t: t.number)
    failed = [t for t in trials if t.state == TrialState.FAIL and has_result(t)]
    return max(failed, key=lambda t: t.number) if failed else None


def check_stale(study: optuna.Study) -> None:
    """Fail the trials of a shared study whose worker stopped beating (Optuna's heartbeat check); a no-op locally."""
    if getattr(study._storage, "get_heartbeat_interval", lambda: None)() is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def claim(study: optuna.Study, number: int, run: str, local: bool, heartbeat: int = DEFAULT_HEARTBEAT) -> int | None:
    """Whether trial ``number`` trains ``run``: None if it does, else the number of the trial that has it.

    A run belongs to the lowest-numbered trial holding it that is queued, running or done; a failed holder gives
    it up (that is a retry). Draws still choosing their configuration (running, no ``run`` yet) with a lower
    number are waited for, so two draws of one configuration never both see the other as absent. A draw whose
    worker died is failed by the heartbeat check on a shared study, and after ``LOCAL_UNDECIDED_GRACE`` locally."""
    checked = time.monotonic()
    while True:
        undecided = []
        for t in all_trials(study):
            if t.number == number:
                continue
            held = t.user_attrs.get("run")
            if held is None:
                if t.number < number and t.state == TrialState.RUNNING and not is_queued(t):
                    undecided.append(t)
                continue
            if held != run:
                continue
            if is_done(t, local):
                return t.number
            if t.number < number and t.state in (TrialState.WAITING, TrialState.RUNNING):
                return t.number
        if not undecided:
            return None
        if local:
            now = datetime.now()
            for t in undecided:
                if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > LOCAL_UNDECIDED_GRACE:
                    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        elif time.monotonic() - checked >= heartbeat:
            checked = time.monotonic()
            check_stale(study)
        time.sleep(0.1)


def _settled(trials: list[FrozenTrial]) -> bool:
    """The run has a recorded outcome: its newest finished trial (duplicates set aside) completed or failed with an error."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    if not finished:
        return False
    last = max(finished, key=lambda t: t.number)
    return last.state == TrialState.COMPLETE or has_result(last)


def _to_queue(plan, trials: list[FrozenTrial], local: bool, include_failed: bool) -> list[tuple[dict, int]]:
    held = by_run(trials)
    todo = []
    for overrides, seed in plan.ordered(trials):
        ts = held.get(run_name(overrides, seed), [])
        if any(is_done(t, local) or t.state in (TrialState.WAITING, TrialState.RUNNING) for t in ts):
            continue
        if not include_failed and _settled(ts):
            continue
        todo.append((overrides, seed))
    return todo


@contextmanager
def queue_lock(study: optuna.Study) -> Iterator[bool]:
    """On a PostgreSQL study, one process at a time queues runs (a session advisory lock named after the study; the
    server drops it with a process that dies holding it). Yields whether a lock is held: False elsewhere, where two
    processes starting at once may both queue a run, and ``claim`` sets the second trial aside when it is drawn."""
    backend = getattr(study._storage, "_backend", study._storage)  # optuna wraps an RDBStorage in a trial cache
    engine = getattr(backend, "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        yield False
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha1(f"sppscl-queue:{study.study_name}".encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield True
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})


def requeue(study: optuna.Study, plan, local: bool, include_failed: bool, trials: list[FrozenTrial] | None = None) -> list[str]:
    """Queue every run of ``plan`` that no trial has finished or holds live, each as one trial named after its run.

    ``include_failed`` (at the start of a command: what a rerun does): also runs that failed with an error, were
    interrupted, or (locally) lost their results.json. Without it (while a command runs): only runs never queued
    or whose trial died without an outcome. Returns the runs queued, in the plan's order.

    On PostgreSQL the runs to queue are read again under ``queue_lock``: machines started at once queue each run
    once, instead of each queueing all of them (every extra trial cost a trip through ask, claim and tell)."""
    trials = all_trials(study) if trials is None else trials
    if not _to_queue(plan, trials, local, include_failed):
        return []
    queued = []
    with queue_lock(study) as locked:
        for overrides, seed in _to_queue(plan, all_trials(study) if locked else trials, local, include_failed):
            name = run_name(overrides, seed)
            attrs = {"config": config_slug(overrides), "overrides": overrides, "seed": seed, "draw": False, "run": name}
            study.enqueue_trial(plan.params(overrides, seed), user_attrs=attrs, skip_if_exists=False)
            queued.append(name)
    return queued


def fail_running(study: optuna.Study, reason: str, only: Callable[[FrozenTrial], bool] = lambda t: True) -> int:
    """Mark running trials failed (their worker is known to be gone), recording why."""
    n = 0
    for t in all_trials(study):
        if t.state == TrialState.RUNNING and only(t):
            if "run" in t.user_attrs:
                study._storage.set_trial_user_attr(t._trial_id, RESULT_KEY, {"status": "failed", "error": reason})
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            n += 1
    return n
