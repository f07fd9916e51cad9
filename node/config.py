"""Configuration: the one place where defaults live.

`load_config` reads YAML, validates it with pydantic (unknown keys and bad values are
errors that name the key) and resolves relative paths against the config file's folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

AE_TITLE = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$")]
DEFAULT_CONFIG_ENV = "PACSNODE_CONFIG"


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    acse: float = Field(30.0, gt=0, description="seconds to wait for association messages")
    dimse: float = Field(60.0, gt=0, description="seconds to wait for DIMSE messages")
    network: float = Field(60.0, gt=0, description="seconds an idle connection may stay open")


class Caller(_Strict):
    ae_title: AE_TITLE
    hosts: list[str] = Field(default_factory=list, description="allowed source addresses; empty: any")


class ListenerConfig(_Strict):
    ae_title: AE_TITLE = "PACSNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1)
    max_pdu: int = Field(262144, ge=0, description="bytes; 0 means unlimited")
    timeouts: Timeouts = Timeouts()
    allowed_callers: list[Caller] | None = Field(
        None, description="calling AE titles that may store; null accepts any caller"
    )


class StorageConfig(_Strict):
    path: Path = Path("var/spool")
    min_free_mb: int = Field(500, ge=0, description="C-STORE is refused below this free space")
    max_instance_mb: int = Field(512, ge=1)


class DatabaseConfig(_Strict):
    url: str = "sqlite:///var/pacsnode.db"


class QueueConfig(_Strict):
    broker_url: str = Field("", description="empty: embedded filesystem broker under storage.path")
    task_time_limit: int = Field(900, ge=10, description="hard limit for one task, seconds")
    visibility_timeout: int = Field(
        3600, ge=60, description="Redis re-delivers an unacknowledged task after this; longer than any job"
    )
    reconcile_seconds: float = Field(60.0, gt=0, description="how often stuck jobs are re-queued")
    heartbeat_seconds: float = Field(10.0, gt=0, description="how often a running inference marks its job alive")
    lost_after_seconds: float = Field(
        60.0, gt=0, description="a running job without a heartbeat for this long has lost its worker"
    )
    requeue_queued_seconds: float = Field(
        300.0, gt=0, description="a queued job unchanged this long has its message sent again (lost broker)"
    )
    max_retries: int = Field(5, ge=0, description="inference retries after a transient error (GPU out of memory)")
    backoff_seconds: float = Field(10.0, gt=0, description="first inference retry delay; doubles each attempt")
    backoff_max_seconds: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> QueueConfig:
        # A heartbeat slower than the loss threshold would hand live jobs to a second worker.
        if self.lost_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("lost_after_seconds must be at least twice heartbeat_seconds")
        # A retry waiting longer than this would be sent again by the reconciler as if lost.
        if self.backoff_max_seconds >= self.requeue_queued_seconds:
            raise ValueError("backoff_max_seconds must be shorter than requeue_queued_seconds")
        # Redis would hand a running task to a second worker before the hard limit stops it.
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError("visibility_timeout must be longer than task_time_limit")
        return self


class CompletionConfig(_Strict):
    quiet_seconds: float = Field(2.0, ge=0, description="quiet time after release before a study is complete")
    max_wait_seconds: float = Field(600.0, gt=0)
    poll_seconds: float = Field(0.1, gt=0)


class Destination(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AE_TITLE
    host: str
    port: int = Field(ge=1, le=65535)
    timeout: float = Field(30.0, gt=0, description="seconds for connect, ACSE and DIMSE")


class ExportConfig(_Strict):
    calling_ae_title: AE_TITLE = "PACSNODE"
    max_retries: int = Field(8, ge=0)
    backoff_seconds: float = Field(2.0, gt=0, description="first retry delay; doubles each attempt")
    backoff_max_seconds: float = Field(300.0, gt=0)


class PipelineConfig(_Strict):
    bundle: Path = Field(description="model bundle folder (configs/metadata.json, models/)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    enabled: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {v!r}")
        return v


class RoutingConfig(_Strict):
    modalities: list[str] = Field(["CR", "DX"], description="modalities of CR/DX images processed")
    body_parts: list[str] = Field(["CHEST"], description="BodyPartExamined values (absent also passes)")
    view_positions: list[str] = Field(["PA", "AP"], description="ViewPosition values (absent also passes)")


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(_Strict):
    listener: ListenerConfig = ListenerConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    queue: QueueConfig = QueueConfig()
    completion: CompletionConfig = CompletionConfig()
    destinations: list[Destination] = Field(default_factory=list)
    export: ExportConfig = ExportConfig()
    pipelines: dict[str, PipelineConfig] = Field(
        default_factory=lambda: {"chest_xray": PipelineConfig(bundle=Path("models/chest_xray"))}
    )
    routing: RoutingConfig = RoutingConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, v: list[Destination]) -> list[Destination]:
        names = [d.name for d in v]
        if len(names) != len(set(names)):
            raise ValueError(f"destination names must be unique: {names}")
        return v

    @property
    def embedded_queue(self) -> bool:
        return not self.queue.broker_url

    def resolve(self, base: Path) -> Config:
        """Return a copy whose relative paths (spool, SQLite file, bundles) are anchored at base."""
        storage = self.storage.model_copy(update={"path": _anchor(self.storage.path, base)})
        url = self.database.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url[len("sqlite:///") :]
            if rel and rel != ":memory:":
                url = "sqlite:///" + str(_anchor(Path(rel), base))
        pipelines = {
            k: p.model_copy(update={"bundle": _anchor(p.bundle, base)}) for k, p in self.pipelines.items()
        }
        return self.model_copy(
            update={"storage": storage, "database": DatabaseConfig(url=url), "pipelines": pipelines}
        )


def _anchor(p: Path, base: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: the explicit one, else $PACSNODE_CONFIG, else ./config.yaml."""
    return Path(explicit or os.environ.get(DEFAULT_CONFIG_ENV) or "config.yaml")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError naming the bad key."""
    p = config_path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from e
    return parse_config(raw, source=str(p)).resolve(p.resolve().parent)


def parse_config(raw: object, source: str = "<config>") -> Config:
    """Validate a mapping; errors name each bad key as a dotted path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "<root>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {msg}")
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems)) from e
