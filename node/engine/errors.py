"""The stages of a job's work and the one error hierarchy that names them.

A `Stage` value is what an operator reads everywhere: `job.error_stage`, the `stage` label of
`pacsnode_stage_duration_seconds`, and the keys of a job's timings. Every failure the engine
records is a `JobError` raised at one stage; its class says whether the task retries it
(node/tasks.py: `autoretry_for`), never its message.
"""

from __future__ import annotations

import enum


class Stage(enum.StrEnum):
    """Where a job's work is, in the order a job goes through it."""

    QUEUE = "queue"  # the job's own row (a message for a job that does not exist)
    READ = "read"  # the source instances, read from the spool
    DECODE = "decode"  # the pipeline refused an image (pixel data it cannot decode)
    INFERENCE = "inference"  # the pipeline's models (timings: the whole pipeline call)
    ROUTE = "route"  # the job's destinations, resolved against the configuration
    ENCODE = "encode"  # the writers build the result objects
    VALIDATE = "validate"  # the validation gate
    SEND = "send"  # C-STORE or STOW-RS to each destination
    CONFIRM = "confirm"  # read-back (C-FIND, QIDO-RS) or Storage Commitment
    INTERNAL = "internal"  # a bug: an error no stage expected


class JobError(Exception):
    """A failure of one job's work at `stage`; the message is what the operator reads."""

    def __init__(self, stage: Stage, message: str) -> None:
        # Both in args: Celery pickles a task's exception as type(e)(*e.args).
        super().__init__(stage, message)
        self.stage = Stage(stage)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PermanentError(JobError):
    """Retrying cannot help (undecodable image, invalid result object): fail the job now."""


class TransientError(JobError):
    """GPU out of memory and the like: the job goes back to queued and the task retries."""


class RetryableExportError(JobError):
    """Some destination did not take (or confirm) everything yet: the export task retries."""
