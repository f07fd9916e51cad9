"""The job engine: what a worker does with a job id.

- `errors.py`: the stages of a job's work (`Stage`) and the errors raised at them.
- `inference.py`: an inference worker claims a job, runs its pipeline, builds, validates and
  stores the result objects, and queues their export.
- `model_outputs.py`: the networks' outputs kept per source image, so a replay or a later
  attempt draws the same objects, byte for byte, without running the networks.
- `cores.py`: how many torch threads the next forward pass gets, from the cores other programs
  leave free.
- `delivery.py`: an export worker sends each stored object to each destination that wants it,
  confirms it there where the destination asks, and closes the job.

Around it: `node/jobs.py` (the job state machine, replay, cancel, the reconciler),
`node/queue.py` (the Celery app, the only place that queues work) and `node/tasks.py` (the
Celery tasks: thin entry points with the retry policy). Networking lives in `node/export.py`.
"""
