"""Ctrl-C during training: the first one asks the run to stop at the next step boundary, where it writes a
checkpoint and ends with one line on how to resume; a second one stops at once."""
from __future__ import annotations

import functools
import signal
import threading

import torch


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C; the message says where the checkpoint is and how to resume."""


class StopRequest:
    """A SIGINT handler for the duration of a ``with`` block (in the main thread; elsewhere Ctrl-C keeps its
    default behaviour). ``requested(accelerator)`` agrees across processes: one process asked, all stop."""

    def __init__(self) -> None:
        self.flag = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.flag:  # the second Ctrl-C
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        flags = accelerator.gather(torch.tensor([float(self.flag)], device=accelerator.device))
        return bool(flags.max().item())


def resume_hint(step: int | None, checkpoint) -> str:
    """The one line an interrupted run ends with (``step`` None: not at a step boundary)."""
    where = "interrupted" if step is None else f"interrupted at step {step}"
    if checkpoint is None:
        return f"{where}, before any checkpoint; nothing to resume"
    return f"{where}; checkpoint {str(checkpoint)!r}; run the same command with train.resume=auto to continue"


_active: list[StopRequest] = []


def current() -> StopRequest:
    """The stop request of the innermost :func:`handles_ctrl_c` training (outside one: one never set)."""
    return _active[-1] if _active else StopRequest()


def handles_ctrl_c(train):
    """A training function that stops cleanly on Ctrl-C: its loop asks :func:`current` at each step boundary; a
    second Ctrl-C, or one before the loop, ends as :class:`TrainingInterrupted` too, not as a traceback."""
    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        with StopRequest() as stop:
            _active.append(stop)
            try:
                return train(*args, **kwargs)
            except TrainingInterrupted:
                raise
            except KeyboardInterrupt:
                raise TrainingInterrupted("interrupted; run the same command with train.resume=auto to continue "
                                          "from the last checkpoint") from None
            finally:
                _active.pop()

    return wrapper
