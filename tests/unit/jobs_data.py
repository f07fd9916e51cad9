"""Jobs written straight into the database, for tests of the state machine and the admin CLI."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from node.config import Config
from node.db.models import Job, JobState, Study, StudyState, utcnow
from node.db.session import session_scope


def make_job(config: Config, state: JobState, age_s: float = 0, **fields: Any) -> int:
    """A job of a new one-instance study in `state`, last changed age_s ago; return its id."""
    then = utcnow() - timedelta(seconds=age_s)
    with session_scope(config.database.url) as s:
        study = Study(study_instance_uid=f"1.2.3.{int(then.timestamp() * 1e6)}", state=StudyState.COMPLETE,
                      first_received_at=then, last_received_at=then, instance_count=1)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, pipeline="chest_xray", state=state, attempt=0, instance_ids=[],
                  timings={}, created_at=then, updated_at=then, **fields)
        s.add(job)
        s.flush()
        return job.id
