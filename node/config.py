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
    visibility_timeout: int = Field(3600, ge=60)
    reconcile_seconds: float = Field(60.0, gt=0, description="how often stuck jobs are re-queued")


class CompletionConfig(_Strict):
    quiet_seconds: float = Field(2.0, ge=0, description="quiet time after release before a study is complete")
    max_wait_seconds: float = Field(600.0, gt=0)
    poll_seconds: float = Field(0.1, gt=0)


#: Result objects a job can produce, in the order they are built (the SR goes out first).
ObjectKind = Literal["sr", "sc", "seg", "gsps"]
OBJECT_KINDS: tuple[ObjectKind, ...] = ("sr", "sc", "seg", "gsps")


class Destination(_Strict):
    """Where results go: a DICOM node (C-STORE) or a DICOMweb service (STOW-RS)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    protocol: Literal["dimse", "stow"] = "dimse"
    ae_title: AE_TITLE | None = Field(None, description="dimse, and stow with confirm: cfind")
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = Field(None, description="stow: DICOMweb base URL, e.g. http://pacs/dicom-web")
    timeout: float = Field(30.0, gt=0, description="seconds for connect, ACSE and DIMSE (or each HTTP request)")
    objects: list[ObjectKind] | None = Field(
        None, description="result objects this destination receives; null: export.objects"
    )
    confirm: Literal["none", "cfind", "qido"] = Field(
        "none", description="read back what was sent (C-FIND or QIDO-RS); the job is done only when confirmed"
    )

    @model_validator(mode="after")
    def _endpoints(self) -> Destination:
        # Each protocol (and read-back) names the keys it needs, so a typo fails at start.
        need: list[str] = []
        if self.protocol == "dimse" or self.confirm == "cfind":
            need += ["ae_title", "host", "port"]
        if self.protocol == "stow" or self.confirm == "qido":
            need.append("url")
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            why = f"protocol {self.protocol}" + (f" with confirm {self.confirm}" if self.confirm != "none" else "")
            raise ValueError(f"{', '.join(missing)} required for {why}")
        if self.url is not None and not re.match(r"https?://", self.url):
            raise ValueError(f"url must start with http:// or https://, not {self.url!r}")
        if self.objects is not None and len(set(self.objects)) != len(self.objects):
            raise ValueError(f"objects lists a kind twice: {self.objects}")
        return self

    def wants(self, export: ExportConfig) -> tuple[str, ...]:
        """The object kinds this destination receives, in build order."""
        chosen = export.objects if self.objects is None else self.objects
        return tuple(k for k in OBJECT_KINDS if k in chosen)


class ExportConfig(_Strict):
    calling_ae_title: AE_TITLE = "PACSNODE"
    max_retries: int = Field(8, ge=0)
    backoff_seconds: float = Field(2.0, gt=0, description="first retry delay; doubles each attempt")
    backoff_max_seconds: float = Field(300.0, gt=0)
    objects: list[ObjectKind] = Field(
        list(OBJECT_KINDS), description="result objects sent to destinations that do not choose their own"
    )


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

    def object_kinds(self) -> tuple[str, ...]:
        """Kinds a job builds: what any destination wants (export.objects when there is none)."""
        if not self.destinations:
            return tuple(k for k in OBJECT_KINDS if k in self.export.objects)
        wanted = {k for d in self.destinations for k in d.wants(self.export)}
        return tuple(k for k in OBJECT_KINDS if k in wanted)

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
