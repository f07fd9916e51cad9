"""The networks' outputs, kept per source image: every run of one model on one content draws the
same objects, byte for byte.

A job's result UIDs come from its sources' content and the model (node/writers/uids.py), so a
replay, or an attempt after a worker died, sends objects under UIDs that the PACS may already
hold; their bytes must be the same. The networks' numbers are not quite stable: another thread
count (node/engine/cores.py) or batch size moves a probability by ~1e-6, which can change a
printed digit of the SR or a pixel of the overlay. Everything after the networks (resizing,
thresholds, drawing, encoding) is exact. So the first run's network outputs are kept in the
database (a few KB: the 256 px lung mask, the 7 x 7 CAMs, the probabilities; see
pipelines.base.ModelOutputs) and later runs of the same model start from them.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from node.config import Config
from node.db.models import ModelOutput, utcnow
from node.db.session import engine_for
from pipelines.base import ModelInfo, ModelOutputs

__all__ = ["keep", "key", "load", "pack", "same", "unpack"]


def key(pipeline_id: str, model: ModelInfo, source: str) -> str:
    """The key of one source's outputs: pipeline id, model identity (version, weights, settings)
    and the source's "<SOP Instance UID>:<sha256>" (new content, a retrained model or other
    preprocessing is computed afresh)."""
    return hashlib.sha256("\n".join((pipeline_id, *model.identity, source)).encode()).hexdigest()


def pack(outputs: ModelOutputs) -> bytes:
    """Named arrays as an .npz (compressed; no pickled objects)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **outputs)
    return buf.getvalue()


def unpack(data: bytes) -> ModelOutputs:
    """What `pack` wrote; refuses pickled objects."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def same(a: ModelOutputs, b: ModelOutputs) -> bool:
    """The same names, shapes, types and values (bit for bit)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def load(config: Config, keys: Iterable[str]) -> dict[str, ModelOutputs]:
    """The outputs kept under these keys (those that have some)."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    with engine_for(config.database.url).connect() as conn:
        rows = conn.execute(select(ModelOutput.key, ModelOutput.data).where(ModelOutput.key.in_(wanted))).tuples().all()
    return {k: unpack(data) for k, data in rows}


def keep(config: Config, pipeline_id: str, model: ModelInfo,
         outputs: Mapping[str, tuple[str, ModelOutputs]]) -> dict[str, ModelOutputs]:
    """Keep each key's outputs ({key: (SOP Instance UID, outputs)}) unless some are kept under
    it already; return what is kept under each key. Where another run kept the same key first,
    its outputs win, and this run must draw from those instead of its own."""
    try:
        return _keep_once(config, pipeline_id, model, outputs)
    except IntegrityError:  # another run committed the same key since we looked: look again, once
        return _keep_once(config, pipeline_id, model, outputs)


def _keep_once(config: Config, pipeline_id: str, model: ModelInfo,
               outputs: Mapping[str, tuple[str, ModelOutputs]]) -> dict[str, ModelOutputs]:
    """One transaction: read what is kept under the keys, insert the rest."""
    # Core statements on one connection, not the ORM: this is on the SR's path.
    with engine_for(config.database.url).begin() as conn:
        have = dict(conn.execute(select(ModelOutput.key, ModelOutput.data)
                                 .where(ModelOutput.key.in_(list(outputs)))).tuples().all())
        rows = [{"key": k, "pipeline": pipeline_id, "model_version": model.version, "sop_instance_uid": sop,
                 "data": pack(out), "created_at": utcnow()}
                for k, (sop, out) in outputs.items() if k not in have]  # fmt: skip
        if rows:
            conn.execute(insert(ModelOutput), rows)
    return {k: unpack(have[k]) if k in have else out for k, (_, out) in outputs.items()}
