"""Configuration: the one place where defaults live.

`load_config` reads YAML, validates it with pydantic (unknown keys and bad values are
errors that name the key) and resolves relative paths against the config file's folder.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

#: A routing rule's priority when it names none: routine. 0-9, 9 the most urgent (STAT).
DEFAULT_PRIORITY = 4

AE_TITLE = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$")]
DEFAULT_CONFIG_ENV = "PACSNODE_CONFIG"


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


def _require_unique(names: list[str], what: str) -> None:
    if len(names) != len(set(names)):
        raise ValueError(f"{what} names must be unique: {names}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    acse: float = Field(30.0, gt=0, description="seconds to wait for association messages")
    dimse: float = Field(60.0, gt=0, description="seconds to wait for DIMSE messages")
    network: float = Field(60.0, gt=0, description="seconds an idle connection may stay open")


class Caller(_Strict):
    ae_title: AE_TITLE
    hosts: list[str] = Field(
        default_factory=list, description="allowed source addresses or networks (CIDR); empty: any"
    )

    @field_validator("hosts")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        # Addresses only: a host name would be resolved on every association, and DNS is not
        # an access control.
        for host in v:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as e:
                raise ValueError(f"{host!r} is not an IP address or network") from e
        return v


class TLSConfig(_Strict):
    """DICOM TLS for the listener (PS3.15 B.1); paths relative to the config file."""

    certificate: Path = Field(description="server certificate chain, PEM")
    private_key: Path = Field(description="server private key, PEM, unencrypted")
    ca_certificates: Path | None = Field(
        None, description="CA bundle that client certificates must chain to; enables verification"
    )
    require_client_cert: bool = Field(False, description="refuse TLS clients without a valid certificate")

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TLSConfig:
        if self.require_client_cert and self.ca_certificates is None:
            raise ValueError("require_client_cert needs ca_certificates to verify client certificates")
        return self


def _caller_tag(value: object) -> str:
    return _ANY_TAG if isinstance(value, str) else _LIST_TAG


_ANY_TAG, _LIST_TAG = "<any>", "<list>"  # union branch names, dropped from error paths
#: A list of callers or the word "any"; tagged so that an error reports only the branch meant.
CallerList = Annotated[
    Annotated[list[Caller], Tag(_LIST_TAG)] | Annotated[Literal["any"], Tag(_ANY_TAG)],
    Discriminator(_caller_tag),
]


class ListenerConfig(_Strict):
    ae_title: AE_TITLE = "PACSNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1, description="per listener process")
    processes: int = Field(
        1, ge=1, le=64,
        description="listener processes serving the port (the first accepts and hands connections to the "
        "least busy): each serves whole associations, so more help senders that open several at once "
        "(node/listener_processes.py)",
    )
    max_pdu: int = Field(262144, ge=0, description="bytes; 0 means unlimited")
    timeouts: Timeouts = Timeouts()
    allowed_callers: CallerList = Field(
        default_factory=list,
        description="calling AE titles that may store; empty (the default) denies everyone; "
        "'any' accepts every caller (logged as a warning at start)",
    )
    tls: TLSConfig | None = Field(None, description="null: plain TCP")

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _no_null_callers(cls, value: object) -> object:
        # null used to mean "anyone": accepting everyone must be said in so many words.
        if value is None:
            raise ValueError("null is not allowed: list the callers, or write 'any' to accept every caller")
        return value


class StorageConfig(_Strict):
    path: Path = Path("var/spool")
    min_free_mb: int = Field(500, ge=0, description="C-STORE is refused below this free space")
    max_instance_mb: int = Field(512, ge=1)
    retention_days: float | None = Field(
        None, gt=0, description="null: keep every file. Else a study's files (instances, results) leave the spool "
                                "this many days after its last activity, once every job is done (see docs/production.md)")


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
    batch_size: int = Field(
        4, ge=1, le=64,
        description="an inference worker takes up to this many waiting jobs into one forward pass",
    )
    inference_workers: int = Field(
        1, ge=1, le=64,
        description="inference worker processes `pacsnode run` starts, each with cores / N torch threads "
        "(production starts its own `pacsnode worker` processes); each holds its own copy of the models",
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


class QuerySource(_Strict):
    """The PACS that sends us studies, asked by C-FIND how many instances a study has."""

    ae_title: AE_TITLE
    host: str
    port: int = Field(ge=1, le=65535)
    timeout: float = Field(5.0, gt=0, description="seconds for connect, ACSE and DIMSE")
    requery_seconds: float = Field(5.0, gt=0, description="ask again at most this often while a study arrives")


class CompletionConfig(_Strict):
    quiet_seconds: float = Field(2.0, ge=0, description="quiet time after release before a study is complete")
    max_wait_seconds: float = Field(600.0, gt=0)
    open_quiet_seconds: float | None = Field(
        60.0, gt=0, description="a study complete once nothing arrived for this long although its association is "
        "still open (a router may hold one for hours); null: wait for the release or max_wait_seconds"
    )
    poll_seconds: float = Field(
        0.1, gt=0, description="how often arriving studies are looked at; one due sooner (quiet time, cap) is completed then"
    )
    query_source: QuerySource | None = Field(
        None, description="C-FIND the source PACS for Number of Study Related Instances; null: do not ask"
    )


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
    confirm: Literal["none", "cfind", "qido", "commitment"] = Field(
        "none", description="read back what was sent (C-FIND or QIDO-RS), or ask the destination to commit "
        "it (Storage Commitment Push Model, dimse only); the job is done only when confirmed",
    )
    commitment_wait_seconds: float = Field(
        120.0, gt=0, description="confirm: commitment: how long a Storage Commitment report may take before "
        "the next export attempt asks again",
    )

    @model_validator(mode="after")
    def _endpoints(self) -> Destination:
        # Each protocol (and read-back) names the keys it needs, so a typo fails at start.
        need: list[str] = []
        if self.confirm == "commitment" and self.protocol != "dimse":
            raise ValueError(f"confirm: commitment needs protocol dimse, not {self.protocol}")
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
    keep_association_seconds: float = Field(
        5.0, ge=0, description="a C-STORE association stays open this long after a send, for the next send to "
        "the same destination (a job's SR and its other objects leave in two sends); 0 releases it at once. "
        "Keep it below the destination's own idle timeout",
    )
    objects: list[ObjectKind] = Field(
        list(OBJECT_KINDS), description="result objects sent to destinations that do not choose their own"
    )


#: External validators of the result objects (node/writers/validate.py); dcmpschk checks GSPS only.
Validator = Literal["dciodvfy", "dcmpschk"]


class ValidationConfig(_Strict):
    """The gate every result object passes before it is stored for sending."""

    tools: list[Validator] = Field(
        ["dciodvfy", "dcmpschk"],
        description="validators every object must pass, besides the pydicom re-read; the node refuses to "
        "start when one is not installed. A shorter list is a weaker gate, chosen explicitly: each object "
        "records which checks ran on it",
    )

    @field_validator("tools")
    @classmethod
    def _once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a validator is listed twice: {v}")
        return v

    def required(self, kinds: Sequence[str]) -> list[str]:
        """The validators that must be installed for results of these kinds (dcmpschk: only with GSPS)."""
        return [t for t in self.tools if t != "dcmpschk" or "gsps" in kinds]


#: Series Number of a pipeline's first result series; the next pipeline takes the next ten.
DEFAULT_SERIES_NUMBER_BASE = 9900


class PipelineConfig(_Strict):
    """One pipeline id: the code that runs it (pipelines/registry.py) and the bundle it runs."""

    implementation: str | None = Field(
        None, description="registered pipeline code that runs this bundle (pipelines/registry.py); "
        "null: the code registered under the pipeline id itself",
    )
    bundle: Path = Field(description="model bundle folder (configs/metadata.json, models/)")
    version: str | None = Field(
        None, description="bundle version to run; the node refuses to start with any other (None: any)"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    enabled: bool = True
    series_number_base: int = Field(
        DEFAULT_SERIES_NUMBER_BASE, ge=0, le=2**31 - 10,
        description="result series are numbered base + 1 (SR), + 2 (overlay SC), + 3 (SEG), + 4 (GSPS); "
        "each enabled pipeline needs its own range",
    )

    def series_numbers(self) -> dict[str, int]:
        """Series Number of each result kind: base + 1, + 2, ... in build order."""
        return {kind: self.series_number_base + i for i, kind in enumerate(OBJECT_KINDS, start=1)}

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {v!r}")
        return v


# Keys a routing rule may match besides DICOM keywords: where the series came from.
ROUTING_PEER_KEYS = ("CallingAE", "CalledAE", "SourceAddress")
# Never matched on: rule keys are stored with the series, and the database holds no patient identity.
ROUTING_FORBIDDEN_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
})


class Condition(_Strict):
    """One test on one attribute; several operators in one condition must all hold.

    A bare scalar in YAML means `equals`, a bare list means `in`. Text comparisons ignore case
    and surrounding spaces; `regex` is a case-sensitive re.search. A multi-valued attribute
    (ImageType) matches when any of its values does; `regex` also sees the whole value joined
    with backslashes. An absent attribute fails every test except `absent`, `present: false`
    and `not`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    equals: str | float | None = None
    in_: list[str | float] | None = Field(None, alias="in")
    regex: str | None = None
    min: float | None = None
    max: float | None = None
    absent: bool | None = None
    present: bool | None = None
    not_: Condition | None = Field(None, alias="not")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("a bare true/false is ambiguous: write {present: true} or {absent: true}")
        if isinstance(v, str | int | float):
            return {"equals": v}
        if isinstance(v, list):
            return {"in": v}
        if isinstance(v, dict) and not v:
            raise ValueError("empty condition")
        return v

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regex {v!r}: {e}") from e
        return v

    @model_validator(mode="after")
    def _range(self) -> Condition:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class RoutingRule(_Strict):
    """A declarative rule: when every condition in `match` holds, process or skip the series."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    match: dict[str, Condition] = Field(default_factory=dict, description="keyword -> condition; {} matches all")
    action: Literal["process", "skip"] = "process"
    pipelines: list[str] = Field(default_factory=list, description="empty: every enabled pipeline")
    reason: str | None = Field(None, description="for the record; {Keyword} is replaced by the value")
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=9,
                          description=f"9 is the most urgent (STAT); {DEFAULT_PRIORITY} is routine")
    destinations: list[str] | None = Field(None, description='names or "sender"; null: every destination')
    objects: list[ObjectKind] | None = Field(
        None, description="result objects for what this rule routes; null: what each destination wants"
    )

    @field_validator("match")
    @classmethod
    def _keys(cls, v: dict[str, Condition]) -> dict[str, Condition]:
        from pydicom.datadict import tag_for_keyword

        for key in v:
            if key in ROUTING_FORBIDDEN_KEYS:
                raise ValueError(f"{key} identifies the patient and may not be used for routing")
            if key not in ROUTING_PEER_KEYS and tag_for_keyword(key) is None:
                raise ValueError(f"{key!r} is neither a DICOM keyword nor one of {', '.join(ROUTING_PEER_KEYS)}")
        return v


_CR_DX = [str(uid) for uid in (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                               DigitalXRayImageStorageForProcessing)]
_SC = [str(uid) for uid in (SecondaryCaptureImageStorage, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
                            MultiFrameGrayscaleWordSecondaryCaptureImageStorage)]
# The built-in policy: frontal chest CR/DX, and secondary captures that say CHEST, go to every
# enabled pipeline; everything else is skipped with its reason. Replaced by routing.rules.
DEFAULT_RULES: list[dict[str, Any]] = [
    {"name": "sc-not-chest", "action": "skip", "reason": "secondary capture without BodyPartExamined CHEST",
     "match": {"SOPClassUID": {"in": _SC}, "BodyPartExamined": {"not": "CHEST"}}},
    {"name": "not-projection-radiograph", "action": "skip",
     "reason": "modality {Modality} / SOP class {SOPClassUID} is not a projection radiograph",
     "match": {"SOPClassUID": {"not": {"in": _CR_DX + _SC}}}},
    {"name": "not-cr-dx", "action": "skip", "reason": "modality {Modality} is not CR or DX",
     "match": {"SOPClassUID": {"in": _CR_DX}, "Modality": {"not": {"in": ["CR", "DX"]}}}},
    {"name": "not-chest", "action": "skip", "reason": "BodyPartExamined {BodyPartExamined} is not CHEST",
     "match": {"BodyPartExamined": {"present": True, "not": "CHEST"}}},
    {"name": "not-frontal", "action": "skip", "reason": "ViewPosition {ViewPosition} is not frontal",
     "match": {"ViewPosition": {"present": True, "not": {"in": ["PA", "AP"]}}}},
    {"name": "frontal-chest", "action": "process", "reason": "frontal chest radiograph", "match": {}},
]


class RoutingConfig(_Strict):
    mode: Literal["first", "all"] = Field(
        "first", description="first: the first matching rule decides; all: every matching rule applies"
    )
    rules: list[RoutingRule] = Field(
        default_factory=lambda: [RoutingRule.model_validate(r) for r in DEFAULT_RULES],
        description="in order; a series no rule matches is skipped",
    )

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: list[RoutingRule]) -> list[RoutingRule]:
        _require_unique([r.name for r in v], "rule")
        return v


class ApiTLS(_Strict):
    certificate: Path = Field(description="server certificate chain, PEM")
    private_key: Path = Field(description="server private key, PEM, unencrypted")


class ApiConfig(_Strict):
    """The HTTP service: REST API, dashboard, metrics, STOW-RS."""

    enabled: bool = Field(True, description="`pacsnode run` starts the API beside the listener")
    host: str = "127.0.0.1"
    port: int = Field(8040, ge=1, le=65535)
    tls: ApiTLS | None = Field(None, description="null: plain HTTP (put a TLS proxy in front)")
    state_dir: Path = Field(Path("var"), description="where the first admin password file is written")
    identifier_key: str | None = Field(
        None, min_length=16,
        description="secret for keyed hashes of Accession Number / Patient ID; null: var/identifier.key (made once)",
    )
    session_hours: float = Field(8.0, gt=0, le=24 * 30, description="a login lasts this long")
    login_attempts: int = Field(5, ge=1, description="failed logins per name or address in login_window_seconds")
    login_window_seconds: float = Field(300.0, gt=0)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses of reverse proxies whose X-Forwarded-For/-Proto are believed (audit 'from where')",
    )


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
    validation: ValidationConfig = ValidationConfig()
    pipelines: dict[str, PipelineConfig] = Field(
        default_factory=lambda: {"chest_xray": PipelineConfig(bundle=Path("models/chest_xray"))}
    )
    routing: RoutingConfig = RoutingConfig()
    logging: LoggingConfig = LoggingConfig()
    api: ApiConfig = ApiConfig()

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, v: list[Destination]) -> list[Destination]:
        _require_unique([d.name for d in v], "destination")
        return v

    @field_validator("pipelines")
    @classmethod
    def _pipeline_code_and_series(cls, v: dict[str, PipelineConfig]) -> dict[str, PipelineConfig]:
        from pipelines.registry import PIPELINES  # names only: no torch here

        for name, pc in v.items():
            code = pc.implementation or name
            if code not in PIPELINES:
                raise ValueError(f"{name}: no pipeline code registered as {code!r} (registered: "
                                 f"{', '.join(sorted(PIPELINES))}); set {name}.implementation")
        enabled = sorted((pc.series_number_base, name) for name, pc in v.items() if pc.enabled)
        for (a, first), (b, second) in zip(enabled, enabled[1:], strict=False):
            if b - a < len(OBJECT_KINDS):
                raise ValueError(f"{second}.series_number_base {b}: its result series would share numbers with "
                                 f"those of {first} (base {a}); give it its own range, e.g. {a + 10}")
        return v

    @model_validator(mode="after")
    def _commitment_reports_reach_the_listener(self) -> Config:
        # A Storage Commitment SCP sends its report to the AE title that asked (our calling AE
        # title), at the address it has for it: the listener must answer to that title.
        asking = [d.name for d in self.destinations if d.confirm == "commitment"]
        if asking and self.export.calling_ae_title.strip() != self.listener.ae_title.strip():
            raise ValueError(
                f"destinations {', '.join(asking)} confirm by commitment: their reports come back to "
                f"export.calling_ae_title {self.export.calling_ae_title!r}, but the listener answers as "
                f"listener.ae_title {self.listener.ae_title!r}; make the two the same"
            )
        return self

    @model_validator(mode="after")
    def _rule_targets(self) -> Config:
        dests = {d.name for d in self.destinations} | {"sender"}
        for rule in self.routing.rules:
            for p in rule.pipelines:
                if p not in self.pipelines:
                    raise ValueError(f"routing rule {rule.name!r}: unknown pipeline {p!r} (pipelines: {sorted(self.pipelines)})")
            for d in rule.destinations or ():
                if d not in dests:
                    raise ValueError(f"routing rule {rule.name!r}: unknown destination {d!r} (known: {sorted(dests)})")
        return self

    def object_kinds(self, destinations: Sequence[Destination] | None = None,
                     routed: Sequence[str] | None = None) -> tuple[str, ...]:
        """Kinds a job builds: what any of its destinations wants (export.objects when none),
        limited to what its routing rules ask for (`routed`; None: no limit)."""
        dests = self.destinations if destinations is None else destinations
        wanted: set[str]
        if not dests:
            wanted = set(self.export.objects)
        else:
            wanted = {k for d in dests for k in d.wants(self.export)}
        if routed is not None:
            wanted &= set(routed)
        return tuple(k for k in OBJECT_KINDS if k in wanted)

    def destinations_for(self, names: Sequence[str] | None, calling_ae: str | None) -> list[Destination]:
        """The destinations a routing decision names (None: all). "sender" is the configured
        destination whose AE title is the study's calling AE: DICOM gives no return address."""
        if names is None:
            return list(self.destinations)
        by_name = {d.name: d for d in self.destinations}
        chosen: list[Destination] = []
        for name in names:
            if name == "sender":
                match = [d for d in self.destinations if calling_ae and d.ae_title == calling_ae]
                if not match:
                    raise ValueError(f"results go back to the sender, but no destination has AE title {calling_ae!r}")
                found = match[0]
            elif name in by_name:
                found = by_name[name]
            else:
                raise ValueError(f"destination {name!r} is no longer configured")
            if found not in chosen:
                chosen.append(found)
        return chosen

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
        listener = self.listener
        if listener.tls is not None:
            tls = listener.tls
            listener = listener.model_copy(update={"tls": tls.model_copy(update={
                "certificate": _anchor(tls.certificate, base),
                "private_key": _anchor(tls.private_key, base),
                "ca_certificates": _anchor(tls.ca_certificates, base) if tls.ca_certificates else None,
            })})
        api = self.api.model_copy(update={"state_dir": _anchor(self.api.state_dir, base)})
        if api.tls is not None:
            api = api.model_copy(update={"tls": api.tls.model_copy(update={
                "certificate": _anchor(api.tls.certificate, base),
                "private_key": _anchor(api.tls.private_key, base)})})
        return self.model_copy(
            update={"listener": listener, "storage": storage, "database": DatabaseConfig(url=url),
                    "pipelines": pipelines, "api": api}
        )


def _anchor(p: Path, base: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: the explicit one, else $PACSNODE_CONFIG, else ./config.yaml."""
    return Path(explicit or os.environ.get(DEFAULT_CONFIG_ENV) or "config.yaml")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError naming the bad key and its line."""
    p = config_path(path)
    try:
        text = p.read_text()
        raw = yaml.safe_load(text) or {}
        tree = yaml.compose(text)
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from e
    return parse_config(raw, source=str(p), tree=tree).resolve(p.resolve().parent)


def _line(tree: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest node of `loc` that the YAML document has (a missing key
    points at its parent mapping)."""
    node, line = tree, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def parse_config(raw: object, source: str = "<config>", tree: yaml.Node | None = None) -> Config:
    """Validate a mapping; errors name each bad key as a dotted path (and its line, given the
    YAML node tree)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if p not in (_ANY_TAG, _LIST_TAG))
            key = ".".join(str(x) for x in _named_loc(raw, loc)) or "<root>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            line = _line(tree, loc)
            problems.append(f"line {line}: {key}: {msg}" if line else f"{key}: {msg}")
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems)) from e


def _named_loc(raw: dict[str, Any], loc: tuple[int | str, ...]) -> list[int | str]:
    """routing.rules.2.match -> routing.rules[name].match, so an error names the rule."""
    parts = list(loc)
    if parts[:2] == ["routing", "rules"] and len(parts) > 2 and isinstance(parts[2], int):
        rules = (raw.get("routing") or {}).get("rules")
        if isinstance(rules, list) and parts[2] < len(rules) and isinstance(rules[parts[2]], dict):
            name = rules[parts[2]].get("name")
            if name:
                parts[1:3] = [f"rules[{name}]"]
    return parts
