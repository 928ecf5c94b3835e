"""Checkpoints of a training run: Orbax `CheckpointManager` in `WORKDIR/checkpoints`.

Each step directory holds three items (the layout `sorted_jax.model_io` reads):

    checkpoints/<step>/state   Orbax pytree {"params", "opt_state", "step"} (sharded arrays)
    checkpoints/<step>/data    JSON: the data iterator position (`DataIterator.state_dict()`)
    checkpoints/<step>/meta    JSON: the training config, exits, model config, ...

Saves are asynchronous where Orbax allows (the device-to-host copy happens before `save`
returns, so the caller may donate the state to the next step right away) and atomic: a step
appears in `all_steps()` only once it is complete. Restores read every array straight onto the
sharding of the abstract train state, so each host reads only its own shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sorted_jax.errors import CheckpointError
from sorted_jax.model_io import CHECKPOINTS_DIR
from sorted_jax.model_io import DATA_ITEM as DATA
from sorted_jax.model_io import META_ITEM as META
from sorted_jax.model_io import STATE_ITEM as STATE
from sorted_jax.train_step import TrainState


def state_tree(state: TrainState) -> dict[str, Any]:
    """The saved form of a train state: a plain dict, as `model_io` expects."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def restore_target(abstract_state: TrainState, shardings: TrainState) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct`s carrying the run's shardings, in the saved dict layout."""
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, shardings)
    return state_tree(target)


class Checkpointer:
    """Save / restore train state, data position and run metadata in `WORKDIR/checkpoints`."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINTS_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
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

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_state: Mapping[str, Any],
             meta: Mapping[str, Any]) -> bool:
        """Start saving `state` as `step` (returns once the arrays are copied off the devices).

        A step that is already on disk is left alone (returns False): after a resume, the
        final save of a run that had nothing left to do must not rewrite its last checkpoint.
        """
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state_tree(state)),
            DATA: ocp.args.JsonSave(dict(data_state)),
            META: ocp.args.JsonSave(dict(meta)),
        })
        try:
            return bool(self.manager.save(step, args=args, force=True))
        except Exception as e:  # disk full, permissions, ...: say where
            raise CheckpointError(f"could not save step {step} to {self.directory}: {e}") from e

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

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
            raise CheckpointError(
                f"cannot restore step {step} from {self.directory} onto this run's train state "
                f"(did the model, optimizer or exit set change since it was written? start a new "
                f"workdir, or load its weights with init_from): {e}") from e
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

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        self.manager.close()
