"""Typed settings of a node, loaded from ``config/node.toml`` and the environment.

The file is found from ``--config``, else ``DICOM_AI_NODE_CONFIG``, else ``config/node.toml``
in the working directory if it exists; without any file the embedded defaults apply (SQLite and
the spool under ``var/``, the bundled demo models). Every setting can be overridden by an
environment variable ``DICOM_AI_NODE_<SECTION>__<KEY>`` (for example
``DICOM_AI_NODE_DICOM__PORT=11113``); lists and tables take JSON.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "DICOM_AI_NODE_CONFIG"
DEFAULT_CONFIG = Path("config/node.toml")

# PS3.5 Section 6.2, VR "AE": up to 16 characters, no backslash or control characters.
_AE_TITLE = r"^[ -\[\]-~]{1,16}$"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Section):
    """DICOM over TLS for the listener (PS3.15 Annex B.1): when enabled, it speaks TLS only."""

    enabled: bool = False
    certificate: Path | None = Field(default=None, description="PEM certificate (chain)")
    private_key: Path | None = Field(default=None, description="PEM private key, unencrypted")
    ca_certificates: Path | None = Field(
        default=None, description="PEM CA certificates that client certificates must chain to"
    )
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("certificate and private_key are required when TLS is enabled")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self


def _networks(values: list[str]) -> list[str]:
    """Check IP addresses and networks (``10.0.0.5``, ``10.0.0.0/24``, ``fd00::/8``)."""
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return values


class ConnectionLimits(_Section):
    """What one peer may hold of the DICOM listener before and after it associates (see
    ``docs/security.md``): pending connections have not yet sent their A-ASSOCIATE-RQ."""

    pre_association_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a new connection has for its TLS handshake and A-ASSOCIATE-RQ",
    )
    max_pending_per_address: int = Field(default=4, ge=1)
    max_pending: int = Field(default=32, ge=1)
    max_associations_per_address: int = Field(default=5, ge=1)
    max_associations_per_ae: int = Field(default=5, ge=1)
    min_bytes_per_second: float = Field(
        default=1024,
        ge=0,
        description="A peer slower than this mid-PDU is cut off after the grace; 0 = no floor",
    )
    slow_sender_grace_seconds: float = Field(default=10.0, gt=0)


class DicomSettings(_Section):
    """The DICOM listener (the SCP that a PACS sends to)."""

    ae_title: str = Field(default="AINODE", pattern=_AE_TITLE)
    bind: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(
        default=[], description="Calling AE titles allowed to associate; empty = any"
    )
    allowed_addresses: dict[str, list[str]] = Field(
        default={},
        description="Calling AE title -> IP addresses/networks it may associate from; "
        '"*" applies to the AE titles not listed; absent = any address',
    )
    tls: TlsSettings = TlsSettings()
    limits: ConnectionLimits = ConnectionLimits()
    maximum_associations: int = Field(default=10, ge=1)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=30.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    maximum_pdu_size: int = Field(default=0, ge=0, description="0 = unlimited")
    max_instance_mb: float = Field(
        default=2048,
        gt=0,
        description="Refuse larger instances (0xA700, PS3.4 B.2.3): bounds one file in the "
        "spool and in memory, as pynetdicom holds a whole data set before the handler runs",
    )

    @field_validator("ae_title")
    @classmethod
    def _strip(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("an AE title cannot be blank")
        return value.strip()

    @field_validator("allowed_addresses")
    @classmethod
    def _check_addresses(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {ae.strip(): _networks(networks) for ae, networks in value.items()}

    @model_validator(mode="after")
    def _addresses_of_allowed_aets(self) -> DicomSettings:
        if self.allowed_calling_aets:
            unknown = set(self.allowed_addresses) - {"*", *self.allowed_calling_aets}
            if unknown:
                raise ValueError(
                    f"allowed_addresses: {', '.join(sorted(unknown))} not in allowed_calling_aets"
                )
        return self


class StorageSettings(_Section):
    """Where received instances, results and (by default) the job log live."""

    data_dir: Path = Path("var")
    min_free_mb: int = Field(
        default=500, ge=0, description="Refuse new instances (0xA700) below this free space"
    )
    retention_days: float = Field(
        default=0,
        ge=0,
        description="Delete received files of processed series after this many days "
        "(0 = keep); results and the job log are kept",
    )


class DatabaseSettings(_Section):
    """The job log. Empty ``url`` means SQLite at ``<data_dir>/jobs.sqlite``."""

    url: str = ""
    busy_timeout_ms: int = Field(default=30000, ge=0)


class HttpSettings(_Section):
    """The HTTP API and dashboard."""

    bind: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token: str = ""
    public_url: str = Field(default="", description="Where users reach the dashboard")
    stow_max_mb: float = Field(
        default=2048,
        gt=0,
        description="Refuse larger STOW-RS request bodies (HTTP 413); one instance in it is "
        "bounded by [dicom] max_instance_mb as over C-STORE",
    )


class AuditSettings(_Section):
    """The audit trail (PS3.15 A.5): always in the job log; also sent to a syslog audit
    repository (RFC 5424 over TCP, or TLS with ``tls``) when ``syslog`` is set."""

    syslog: str = Field(default="", description='"host:port" of the audit repository; "" = none')
    tls: bool = False
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    enterprise_site_id: str = ""
    queue_size: int = Field(default=10000, ge=1)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=60.0, gt=0)

    @field_validator("syslog")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not host:port")
        return value


class AssembleSettings(_Section):
    """When a series counts as complete: released association and quiet for this long."""

    stable_seconds: float = Field(default=10.0, ge=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    max_instances_per_series: int = Field(
        default=5000,
        ge=1,
        description="A series (or study, for study-level jobs) with more instances is stored "
        "but its job fails at once with 'series too large' instead of running",
    )


class WorkerSettings(_Section):
    """The job worker: leases let another worker take over a job whose worker died."""

    lease_seconds: float = Field(default=60.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts that failed or crashed the worker process on this job; "
        "then the job is failed (docs/reliability.md, the crash policy)",
    )
    max_interruptions: int = Field(
        default=10,
        ge=1,
        description="Attempts ended from outside (kill, lost host, expired lease), which do "
        "not count as failures; a backstop against a job killed every time (out of memory)",
    )
    job_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="A job whose inference runs longer is stopped and failed (not retried)",
    )
    inference_threads: int = Field(
        default=0,
        ge=0,
        description="Intra-op threads of TensorFlow and ONNX Runtime in a work process; 0: one "
        "per usable core. Fewer leave cores to the receivers (infer.configure_threads)",
    )
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Scheduling niceness of a work process (Linux nice, 0-19): the receivers "
        "on the same host get the cores first when both want them; inference still uses every "
        "core while they are idle",
    )


class DispatchSettings(_Section):
    """Sending results: timeouts and the retry schedule (exponential backoff, capped)."""

    timeout: float = Field(default=30.0, gt=0)
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=12, ge=1)
    poll_seconds: float = Field(default=1.0, gt=0)
    commitment_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="How long to wait for a PACS's Storage Commitment answer before sending "
        "the results again and asking again",
    )


class PeerSettings(_Section):
    """A DICOM peer: its name here, AE title, address, and TLS options."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    ae_title: str = Field(pattern=_AE_TITLE)
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = Field(default=False, description="DICOM over TLS (PS3.15 Annex B.1)")
    ca_certificates: Path | None = Field(
        default=None, description="PEM CAs the peer's certificate must chain to; none = system's"
    )
    certificate: Path | None = Field(default=None, description="Our client certificate (PEM)")
    private_key: Path | None = Field(default=None, description="Its private key (PEM)")
    server_name: str = Field(default="", description="Name in the peer's certificate; = host")

    @model_validator(mode="after")
    def _tls_options(self) -> PeerSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        uses_tls = self.ca_certificates or self.certificate or self.server_name
        if uses_tls and not self._uses_tls():
            raise ValueError("TLS options given but tls = false")
        return self

    def _uses_tls(self) -> bool:
        return self.tls


class DestinationSettings(PeerSettings):
    """A peer that receives results: by C-STORE (``type = "dicom"``: ``ae_title``,
    ``host``, ``port``) or by STOW-RS (``type = "dicomweb"``: ``url``, the DICOMweb
    service root, with ``username`` and ``password`` or a bearer ``token``)."""

    type: Literal["dicom", "dicomweb"] = "dicom"
    ae_title: str = Field(default="", pattern=rf"^$|{_AE_TITLE}")
    host: str = ""
    port: int = Field(default=104, ge=1, le=65535)
    url: str = Field(
        default="", pattern=r"^$|^https?://", description="DICOMweb service root (dicomweb)"
    )
    username: str = Field(default="", description="HTTP basic user (dicomweb)")
    password: SecretStr = Field(default=SecretStr(""), description="HTTP basic password")
    token: SecretStr = Field(default=SecretStr(""), description="HTTP bearer token (dicomweb)")
    objects: list[Literal["sr", "sc", "kos"]] = Field(
        default=["sr", "sc", "kos"],
        min_length=1,
        description="Which of a route's result objects this peer gets: e.g. sc only for a "
        "PACS whose viewer shows no SR, sr + kos for an IHE AI Results consumer",
    )
    sc_layout: Literal["below", "above", "overlay"] = Field(
        default="below",
        description="Where the Secondary Capture has the result text: in a band below or "
        "above the image, clear of the viewer's own text in the corners, or over the "
        "image's top left corner",
    )
    commitment: bool = Field(
        default=False,
        description="Ask the peer to commit what it was sent (Storage Commitment Push Model, "
        "PS3.4 Annex J); a delivery is complete only when the peer confirms it (dicom)",
    )
    commitment_wait_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long the association that asked for commitment stays open for the "
        "peer's answer on it (PS3.4 J.3.3.1.2); a later answer comes on the peer's own "
        "association (dicom)",
    )

    @model_validator(mode="after")
    def _type_options(self) -> DestinationSettings:
        if self.type == "dicom":
            if not self.ae_title or not self.host:
                raise ValueError("a dicom destination needs ae_title and host")
            if self.url or self.username or self.token.get_secret_value():
                raise ValueError("url, username and token are for dicomweb destinations")
        else:
            if not self.url:
                raise ValueError("a dicomweb destination needs url")
            if self.username and self.token.get_secret_value():
                raise ValueError("give username and password, or token, not both")
            if self.tls or self.server_name:
                raise ValueError("a dicomweb destination uses TLS by an https:// url")
            if self.commitment:
                raise ValueError("storage commitment is for dicom destinations")
        return self

    def _uses_tls(self) -> bool:
        return self.tls or self.url.startswith("https://")

    @property
    def address(self) -> str:
        """Where the destination is, for people: ``AE@host:port`` or the URL."""
        return self.url if self.type == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"


class SourceSettings(PeerSettings):
    """A PACS the node queries (C-FIND) and retrieves studies from (C-MOVE or C-GET).

    With ``retrieve = "move"`` the PACS sends the instances to the node's own listener (it
    must know the node's AE title, host and port as a move destination); with ``"get"`` they
    come back on the node's own association (C-GET, PS3.4 C.4.3). A backfill is throttled:
    at most ``max_associations`` studies retrieved at once and, on average,
    ``max_instances_per_second`` (0 = no limit).
    """

    retrieve: Literal["move", "get"] = "move"
    max_associations: int = Field(default=1, ge=1, le=16)
    max_instances_per_second: float = Field(default=0, ge=0)
    timeout: float = Field(default=600.0, gt=0, description="DIMSE timeout of a retrieve")


class RouteSettings(_Section):
    """A rule: series whose attributes match ``where`` go to ``model``.

    ``where`` maps a DICOM keyword (or ``CallingAETitle``) to a list of accepted values
    (case-insensitive) or to a string; a string ``/.../`` is a regular expression.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    model: str
    where: dict[str, list[str] | str] = {}
    level: Literal["series", "study"] = "series"
    outputs: list[Literal["sr", "sc", "kos"]] = ["sr", "sc"]
    destinations: list[str] = []
    priority: int = Field(default=0, description="Higher runs first")
    shadow: bool = Field(
        default=False,
        description="Shadow mode: run the model and record its results, deliver and notify nothing",
    )
    fetch_missing: str | None = Field(
        default=None,
        description="Study level: the [[sources]] name asked for series the node lacks "
        "before the study's job is queued",
    )

    @field_validator("where")
    @classmethod
    def _check_where(cls, where: dict[str, list[str] | str]) -> dict[str, list[str] | str]:
        from pydicom.datadict import tag_for_keyword

        for key, accepted in where.items():
            if key != "CallingAETitle" and tag_for_keyword(key) is None:
                raise ValueError(f"{key!r} is not a DICOM keyword")
            for value in [accepted] if isinstance(accepted, str) else accepted:
                if len(value) > 1 and value.startswith("/") and value.endswith("/"):
                    try:
                        re.compile(value[1:-1])
                    except re.error as exc:
                        raise ValueError(
                            f"{key}: bad regular expression {value!r}: {exc}"
                        ) from None
        return where


class ModelsSettings(_Section):
    """Where model packages are found besides the bundled ones."""

    dirs: list[Path] = []


Trigger = Literal["positive", "failed"]


class NotificationSettings(_Section):
    """A webhook: ``url`` receives a JSON POST for each event named in ``on``.

    ``positive``: a job's result is a positive finding (once per job). ``failed``: a job
    failed (inference) or could not deliver its results (each time it happens).
    """

    url: str = Field(pattern=r"^https?://", description="Where to POST (http or https)")
    on: list[Trigger] = Field(default=["positive", "failed"], min_length=1)
    headers: dict[str, str] = Field(
        default={}, description="Extra request headers, e.g. an Authorization for the receiver"
    )
    timeout: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)


class ClusterSettings(_Section):
    """Nodes sharing one job log (PostgreSQL) and one data folder."""

    heartbeat_seconds: float = Field(default=5.0, gt=0)
    node_timeout_seconds: float = Field(
        default=60.0, gt=0, description="A node silent this long is dead; the others take over"
    )

    @model_validator(mode="after")
    def _timeout_covers_heartbeats(self) -> ClusterSettings:
        if self.node_timeout_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError(
                "node_timeout_seconds: must be more than twice heartbeat_seconds "
                f"({self.heartbeat_seconds:g})"
            )
        return self


Role = Literal["receive", "work", "dispatch", "notify", "web"]
ROLES: tuple[Role, ...] = ("receive", "work", "dispatch", "notify", "web")
"""The roles of a node, each run in processes of its own by ``serve`` (docs/architecture.md)."""


class ProcessesSettings(_Section):
    """How many processes ``serve`` runs per role, and how it restarts and stops them."""

    receive: int = Field(
        default=0,
        ge=0,
        description="SCP processes sharing the DICOM port (0 = one per core)",
    )
    work: int = Field(
        default=1,
        ge=1,
        description="Processes that assemble, infer and report; each loads the models once",
    )
    dispatch: int = Field(default=1, ge=1, description="Processes that send results")
    restart_seconds: float = Field(
        default=1.0,
        gt=0,
        description="A child that dies is restarted after this, doubled at each death in a "
        "row up to restart_max_seconds (reset once it has run for restart_max_seconds)",
    )
    restart_max_seconds: float = Field(default=60.0, gt=0)
    drain_seconds: float = Field(
        default=60.0,
        gt=0,
        description="On SIGTERM, how long each role may take to finish what it holds "
        "(associations, jobs, the file in flight) before it is killed",
    )

    def count(self, role: Role) -> int:
        """The number of processes of ``role``: one each for notify and web."""
        if role == "receive":
            return self.receive or os.cpu_count() or 1
        if role in ("work", "dispatch"):
            return int(getattr(self, role))
        return 1


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = False


class Settings(BaseSettings):
    """All settings of a node."""

    model_config = SettingsConfigDict(
        env_prefix="DICOM_AI_NODE_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    node_name: str = Field(default_factory=lambda: os.uname().nodename)
    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()
    assemble: AssembleSettings = AssembleSettings()
    worker: WorkerSettings = WorkerSettings()
    dispatch: DispatchSettings = DispatchSettings()
    audit: AuditSettings = AuditSettings()
    models: ModelsSettings = ModelsSettings()
    cluster: ClusterSettings = ClusterSettings()
    processes: ProcessesSettings = ProcessesSettings()
    logging: LoggingSettings = LoggingSettings()
    destinations: list[DestinationSettings] = []
    sources: list[SourceSettings] = []
    routes: list[RouteSettings] = []
    notifications: list[NotificationSettings] = []

    @model_validator(mode="after")
    def _cross_check(self) -> Settings:
        names = [d.name for d in self.destinations]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"destinations: duplicate name {name!r}")
        sources = [s.name for s in self.sources]
        for i, name in enumerate(sources):
            if name in sources[:i]:
                raise ValueError(f"sources: duplicate name {name!r}")
        route_names = [r.name for r in self.routes]
        for i, route in enumerate(self.routes):
            if route.name in route_names[:i]:
                raise ValueError(f"routes[{i}].name: duplicate route name {route.name!r}")
            if route.fetch_missing is not None:
                if route.level != "study":
                    raise ValueError(f'routes[{i}].fetch_missing: only for level = "study"')
                if route.fetch_missing not in sources:
                    raise ValueError(
                        f"routes[{i}].fetch_missing: unknown source {route.fetch_missing!r} "
                        f"(known: {', '.join(sources) or 'none'})"
                    )
            for dest in route.destinations:
                if dest not in names and dest != "outbox":
                    raise ValueError(
                        f"routes[{i}].destinations: unknown destination {dest!r} "
                        f"(known: {', '.join([*names, 'outbox'])})"
                    )
        return self

    @property
    def database_url(self) -> str:
        """The job log's SQLAlchemy URL."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.data_dir / 'jobs.sqlite').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first, so that any key of the file can be overridden by it.
        return env_settings, init_settings, TomlConfigSettingsSource(settings_cls)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def config_path(explicit: Path | None) -> Path | None:
    """The configuration file to read: ``--config``, the environment, or the default."""
    if explicit is not None:
        return explicit
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (see :func:`config_path`) and the environment.

    Raises :class:`ConfigError` with one message naming the key on any problem.
    """
    resolved = config_path(path)
    if resolved is not None:
        if not resolved.is_file():
            raise ConfigError(f"configuration file {resolved} does not exist")
        try:
            with resolved.open("rb") as f:
                tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{resolved}: not valid TOML: {exc}") from None

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=resolved)

    try:
        loaded = FileSettings(**overrides)
    except ValidationError as exc:
        where = f"{resolved}: " if resolved else ""
        raise ConfigError(f"{where}{_describe(exc)}") from None
    # As a plain Settings, validated already: the subclass that names the file is local to
    # this call, and ``serve`` pickles the settings to its children (supervisor.ChildSpec).
    return Settings.model_construct(loaded.model_fields_set, **dict(loaded))
