"""Checkpoints of a training run: Orbax `CheckpointManager` in `WORKDIR/checkpoints`.

Each step directory holds three items (the layout `sorted_jax.io.model_io` reads):

    checkpoints/<step>/state   Orbax pytree {"params", "opt_state", "step"} (sharded arrays)
    checkpoints/<step>/data    JSON: the data iterator position (`DataIterator.state_dict()`)
    checkpoints/<step>/meta    JSON: the training config, exits, model config, ...

Saves are asynchronous where Orbax allows (the device-to-host copy happens before `save`
returns, so the caller may donate the state to the next step right away) and atomic: a step
appears in `all_steps()` only once it is complete. Restores read every array straight onto the
sharding of the abstract train state, so each host reads only its own shards.

A failed asynchronous save (a full disk) is noticed at the next `poll()` (the trainer calls it
at every step boundary) and raised once, as a `CheckpointError` naming the last good step.
Once a save is committed its files are pinned in a manifest (`checkpoint_integrity`), so a
later resume can tell a damaged step from one that does not fit the run; `on_saved` hears of
it then (not when the save starts). Old steps are deleted past `keep`, but never the newest
healthy one (`NewestHealthy`): the step just saved has no known health yet. `close()` raises a
final save that failed (or, when the caller is already failing, says it on its own line).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policy

from sorted_jax.core.errors import CheckpointError, one_line
from sorted_jax.io.model_io import CHECKPOINTS_DIR
from sorted_jax.io.model_io import DATA_ITEM as DATA
from sorted_jax.io.model_io import META_ITEM as META
from sorted_jax.io.model_io import STATE_ITEM as STATE
from sorted_jax.training import checkpoint_integrity as integrity
from sorted_jax.training.train_step import TrainState


def state_tree(state: TrainState) -> dict[str, Any]:
    """The saved form of a train state: a plain dict, as `model_io` expects."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def restore_target(abstract_state: TrainState, shardings: TrainState) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct`s carrying the run's shardings, in the saved dict layout."""
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, shardings)
    return state_tree(target)


class _QuietOrbaxTracebacks(logging.Filter):
    """Drop Orbax's logged tracebacks of a failed background save: the same failure is raised
    once, as our `CheckpointError`, at the next step boundary (a full disk logged ~16, and
    asyncio as many again)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[2] is None:
            return True
        frames = traceback.extract_tb(record.exc_info[2])
        return not any("orbax" in f.filename for f in frames)


_QUIET = _QuietOrbaxTracebacks()


def _quiet_closed_loops(previous: Any) -> Any:
    """An unraisable hook that drops "Event loop is closed": the writes still in flight when a
    background save failed complete after Orbax closed its loop (one traceback each)."""
    def hook(unraisable: Any) -> None:
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.sorted_jax_quiet = True
    return hook


def _quiet_failed_saves() -> None:
    """Installed once per process, kept: a failed save's threads may log after `close`."""
    # absl: Orbax's own logged tracebacks; asyncio: "Task exception was never retrieved" for
    # the same failed writes, logged when the tasks are collected (often at exit).
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_QUIET)  # a no-op when already there
    if not getattr(sys.unraisablehook, "sorted_jax_quiet", False):
        sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)


@dataclasses.dataclass
class NewestHealthy:
    """An Orbax preservation policy: keep the newest step whose manifest says "good" (its
    weights gave a finite loss and gradient norm), whatever `keep` says."""

    workdir: Path

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        good = [c.step for c in checkpoints
                if integrity.health(self.workdir, c.step) == integrity.GOOD]
        newest = max(good, default=None)
        return [c.step == newest for c in checkpoints]


class Checkpointer:
    """Save / restore train state, data position and run metadata in `WORKDIR/checkpoints`."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True,
                 on_saved: Callable[[int], Any] | None = None):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINTS_DIR
        self.writes_manifests = jax.process_index() == 0
        self._unpinned: list[int] = []  # saved steps whose files are not in a manifest yet
        self._on_saved = on_saved  # called with each step once it is committed to disk
        _quiet_failed_saves()
        # The newest `keep` steps, and always the newest healthy one: with keep=1 Orbax would
        # delete the last good step as soon as a new one (whose health is not known yet) is
        # saved.
        policy = None if not keep or keep < 1 else ocp_policy.AnyPreservationPolicy(
            [ocp_policy.LatestN(n=int(keep)), NewestHealthy(self.workdir)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE, DATA, META), options=options)

    # -- queries -----------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def last_good_step(self, excluding: int | None = None) -> int | None:
        """The newest step on disk whose weights were checked finite (`checkpoint_integrity`)."""
        good = [s for s in self.all_steps() if s != excluding and s not in self._unpinned
                and integrity.health(self.workdir, s) == integrity.GOOD]
        return good[-1] if good else None

    def last_good_text(self, excluding: int | None = None) -> str:
        last = self.last_good_step(excluding)
        if last is None:
            return "No checkpoint with finite loss and gradient norm is on disk."
        return f"The last good checkpoint is step {last} in {self.directory}."

    def record_health(self, step: int, health: str, detail: str = "") -> None:
        if self.writes_manifests:
            integrity.record_health(self.workdir, step, health, detail)

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_state: Mapping[str, Any],
             meta: Mapping[str, Any]) -> bool:
        """Start saving `state` as `step` (returns once the arrays are copied off the devices).

        A step that is already on disk is left alone (returns False): after a resume, the
        final save of a run that had nothing left to do must not rewrite its last checkpoint.
        """
        if step in self.manager.all_steps():
            return False
        if self._unpinned:  # Orbax would wait for it anyway: a failure is then that step's
            self.wait()
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state_tree(state)),
            DATA: ocp.args.JsonSave(dict(data_state)),
            META: ocp.args.JsonSave(dict(meta)),
        })
        self.record_health(step, integrity.UNCHECKED)
        try:
            saved = bool(self.manager.save(step, args=args, force=True))
        except Exception as e:  # disk full, permissions, ...: say where
            raise self._save_failed(step, e) from None
        if saved:
            self._unpinned.append(step)
            if not self.manager.is_saving_in_progress():  # a synchronous save
                self._pin()
        return saved

    def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
        # A failed async save leaves Orbax's pending write coroutines un-awaited, and Python
        # reports each at exit ("coroutine ... was never awaited"): noise under the one line
        # that says what failed, printed only when the race leaves one behind.
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                                category=RuntimeWarning)
        self._unpinned = [s for s in self._unpinned if s != step and s in self.all_steps()]
        first = one_line(e)[:300]
        return CheckpointError(
            f"could not save step {step} to {self.directory} ({type(e).__name__}: {first}); "
            f"the run stopped. {self.last_good_text(excluding=step)} Fix the cause (e.g. free "
            "disk space) and re-run the same command to resume.")

    def _pin(self) -> None:
        """Manifests of the saves that have finished; drop those of deleted steps."""
        on_disk = set(self.all_steps())
        pinned = [s for s in self._unpinned if s in on_disk]
        if self.writes_manifests:
            for s in pinned:
                integrity.record_files(self.workdir, s)
            integrity.prune(self.workdir, on_disk)
        self._unpinned = []
        if self._on_saved is not None:
            for s in pinned:
                self._on_saved(s)

    def poll(self) -> None:
        """At a step boundary: raise a failed background save now (one `CheckpointError`
        naming the last good step); pin the saves that have finished."""
        if not self._unpinned:
            return
        pending = self._unpinned[-1]
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(pending, e) from None
        if not self.manager.is_saving_in_progress():
            self._pin()

    def wait(self) -> None:
        """Block until every started save is on disk (a failure raises, as in `poll`)."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(self._unpinned[-1] if self._unpinned else -1, e) from None
        self._pin()

    # -- restore -----------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState
                ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """(train state on `shardings`, data position, meta) of `step`."""
        target = restore_target(abstract_state, shardings)
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(target),
            DATA: ocp.args.JsonRestore(),
            META: ocp.args.JsonRestore(),
        })
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:
            why = integrity.problem(self.workdir, step)
            others = [s for s in self.all_steps() if s != step]
            if why is not None:
                raise CheckpointError(
                    f"step {step} in {self.directory} is {why}; resume from another step with "
                    f"--config.resume_step=N (steps on disk: {others})") from e
            raise CheckpointError(
                f"cannot restore step {step} from {self.directory} onto this run's train state: "
                f"{one_line(e)[:300]}. If the model, optimizer and exit set are unchanged, the "
                f"step is damaged: resume from another with --config.resume_step=N (steps on "
                f"disk: {others}); if they changed, start a new workdir, or load its weights "
                "with init_from") from e
        tree = restored[STATE]
        # Orbax gives optimizer namedtuples back as plain tuples: same leaves, same order.
        leaves = jax.tree.leaves(tree)
        treedef = jax.tree.structure(target)
        if len(leaves) != treedef.num_leaves:
            raise CheckpointError(
                f"step {step} in {self.directory} has {len(leaves)} state arrays, this run's "
                f"train state has {treedef.num_leaves}")
        tree = jax.tree.unflatten(treedef, leaves)
        state = TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
        return state, dict(restored[DATA] or {}), dict(restored[META] or {})

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))
        return dict(restored[META] or {})

    def close(self, failing: BaseException | None = None) -> None:
        """Wait for the saves in flight, then close. One that failed raises its
        `CheckpointError`, unless the caller is already failing (`failing`, its exception):
        then it is printed on its own line, so neither error hides the other."""
        try:
            self.wait()
        except Exception as e:  # a failed save (CheckpointError), a manifest not written
            if failing is None:
                raise
            print(f"sorted_jax.train: warning: {one_line(e)}", file=sys.stderr, flush=True)
        finally:
            self.manager.close()
