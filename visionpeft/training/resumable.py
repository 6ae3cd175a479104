"""Resume, checkpoints and Ctrl-C for a loop of optimizer steps over epochs of a DataLoader, in a few calls
(the DreamBooth runner's; the classification runner spells the same steps out beside its evaluation).

    decision = checkpoints.plan(recipe)        # before the output folder changes
    ...
    steps = ResumableSteps(recipe, accelerator, decision, order, batches_per_epoch, every)
    state = steps.restore()                    # {"step": 0} or what the checkpoint holds
    while step < total:
        for batch in steps.epoch(loader, step):
            ...                                # one micro-batch; on each optimizer step:
            steps.after_step(step, total, {"history": history, ...})

with the training function decorated by :func:`~visionpeft.training.interrupt.handles_ctrl_c`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from visionpeft.training import checkpoints
from visionpeft.training import interrupt
from visionpeft.training.interrupt import TrainingInterrupted, resume_hint


class ResumableSteps:
    def __init__(self, recipe: dict[str, Any], accelerator, decision: checkpoints.Plan, order, batches_per_epoch: int,
                 every: int | None) -> None:
        self.accelerator, self.decision, self.order, self.every = accelerator, decision, order, every
        self.output = Path(recipe["output"])
        self.grad_accum = recipe["train"]["grad_accum"]
        self.keep = recipe["train"]["keep_checkpoints"]
        self.fingerprint = checkpoints.fingerprint(recipe)
        self.announce = recipe["train"]["resume"] not in checkpoints.FRESH_MODES
        self.per_epoch = -(-batches_per_epoch // self.grad_accum)  # accelerate also steps at the end of the data
        self.last_saved = decision.checkpoint
        self.stop = interrupt.current()  # set by the @handles_ctrl_c training around the loop
        checkpoints.keep_trainable_state(accelerator)

    def restore(self) -> dict[str, Any]:
        """The progress to continue from (``{"step": 0}`` on a fresh start), the accelerator's state loaded."""
        state: dict[str, Any] = {"step": 0}
        if self.decision.action == "resume":
            self.accelerator.load_state(str(self.decision.checkpoint), strict=False)
            state = self.decision.progress()
        if self.announce:
            self.accelerator.print(self.decision.message)
        return state

    def epoch(self, loader, step: int):
        """The rest of the epoch that ``step`` falls in, in the order a run without interruption sees."""
        epoch = step // self.per_epoch
        self.order.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):  # accelerate passes its own epoch count to the sampler at each pass
            loader.set_epoch(epoch)
        done = (step - epoch * self.per_epoch) * self.grad_accum
        return self.accelerator.skip_first_batches(loader, done) if done else loader

    def save(self, step: int, progress: dict[str, Any]) -> Path:
        state = {"step": step, **progress, "fingerprint": self.fingerprint}
        self.last_saved = checkpoints.save_checkpoint(self.accelerator, self.output, state, self.keep)
        return self.last_saved

    def after_step(self, step: int, total: int, progress: dict[str, Any]) -> None:
        """Checkpoint when due; on Ctrl-C, checkpoint and raise :class:`TrainingInterrupted`."""
        if step >= total:
            return
        if self.every and step % self.every == 0:
            self.save(step, progress)
        if self.stop.requested(self.accelerator):
            if self.last_saved is None or self.last_saved.name != f"step_{step}":
                self.save(step, progress)
            raise TrainingInterrupted(resume_hint(step, self.last_saved))

