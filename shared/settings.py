"""One typed settings model for every service, read from ``PROFILEMESH_*`` variables.

Nested fields use ``__``: ``PROFILEMESH_SERVICES__IDENTITY__PORT=6002``. Telemetry follows the
standard OpenTelemetry variables under their own names (``OTEL_TRACES_EXPORTER``,
``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``...). Settings are built once at the edge
(the CLI) and passed in; no other module reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SERVICE_NAMES = ("ingestion", "identity", "features", "scoring", "activation")
"""Every service of the mesh, in the order data flows through them (and the order they start)."""

ServiceName = Literal["ingestion", "identity", "features", "scoring", "activation"]


class Endpoint(BaseModel):
    """Where one service listens (``host`` is also where the others reach it)."""

    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)

    @property
    def target(self) -> str:
        """The gRPC target string, ``host:port``."""
        return f"{self.host}:{self.port}"


class Endpoints(BaseModel):
    """The address of every service; each service is told where the others are."""

    ingestion: Endpoint = Endpoint(port=50051)
    identity: Endpoint = Endpoint(port=50052)
    features: Endpoint = Endpoint(port=50053)
    scoring: Endpoint = Endpoint(port=50054)
    activation: Endpoint = Endpoint(port=50055)

    def of(self, service: str) -> Endpoint:
        """The endpoint of ``service`` (one of :data:`SERVICE_NAMES`)."""
        if service not in SERVICE_NAMES:
            raise ValueError(f"unknown service {service!r}; expected one of {SERVICE_NAMES}")
        endpoint: Endpoint = getattr(self, service)
        return endpoint


class ClientSettings(BaseModel):
    """How services call each other: default deadline and retries of transient failures."""

    deadline_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=5)
    initial_backoff_seconds: float = Field(default=0.1, gt=0)
    max_backoff_seconds: float = Field(default=2.0, gt=0)


class StreamSettings(BaseModel):
    """How the embedded backend stores each service's log."""

    partitions: int = Field(default=8, ge=1, le=1024)
    """Partitions per stream; fixed when a stream is created (keys must not move)."""

    segment_mib: int = Field(default=64, ge=1)
    """Size at which a partition's active segment file is closed and a new one started."""

    max_pending_mib: int = Field(default=256, ge=1)
    """Appends waiting for the disk beyond this are refused with RESOURCE_EXHAUSTED."""

    heartbeat_seconds: float = Field(default=5.0, gt=0)
    """How often a caught-up subscription gets an empty batch carrying the partition's end."""

    archive_after_hours: float = Field(default=24.0, ge=0)
    """Closed segments of the event log older than this are compacted into Parquet."""

    delete_after_hours: float = Field(default=168.0, ge=0)
    """Closed segments of the other (derived, rebuildable) logs older than this are deleted."""

    maintenance_interval_seconds: float = Field(default=60.0, gt=0)
    """How often retention runs."""


class IngestionSettings(BaseModel):
    """Limits and behaviour of the ingestion service."""

    max_event_bytes: int = Field(default=32 * 1024, ge=1024)
    """Largest accepted event, serialized (Segment's limit is 32 KB)."""

    max_batch_events: int = Field(default=500, ge=1)
    max_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    dedup_window_hours: float = Field(default=24.0, gt=0)
    """A message id seen within this window is a duplicate."""

    dedup_max_ids: int = Field(default=4_000_000, ge=1000)
    """Ids remembered per window generation; past this a generation turns over early, so
    memory stays bounded even under a flood."""

    dedup_snapshot_seconds: float = Field(default=30.0, gt=0)
    """How often the remembered ids are saved (start-up replays the log only since then)."""

    tracking_plans_file: Path | None = None
    """A YAML file of tracking plans loaded at start-up (plans set by RPC are kept too)."""


class IdentitySettings(BaseModel):
    """Where the identity service's rules come from at first start (later: UpdateIdentityRules)."""

    rules_file: Path | None = None
    """A YAML file of identity rules; without one, the built-in defaults apply."""

    match_min_records: int = Field(default=1000, ge=2)
    """Customer records stored before the online matching model is first fitted (when the
    rules enable matching); it is refitted each time their number doubles."""


class FeaturesSettings(BaseModel):
    """Where the features service's definitions come from at first start (later: by RPC)."""

    definitions_file: Path | None = None
    """A YAML file of feature definitions added to the built-in ones."""


class ActivationSettings(BaseModel):
    """How deliveries are retried before they go to the dead-letter queue."""

    max_attempts: int = Field(default=8, ge=1)
    initial_backoff_seconds: float = Field(default=1.0, gt=0)
    max_backoff_seconds: float = Field(default=300.0, gt=0)


class TlsSettings(BaseModel):
    """Mutual TLS on every connection of the mesh (``profilemesh certs create`` makes a set).

    One certificate serves a process as server and as client: servers accept only clients
    whose certificate the CA signed, and clients check the server's certificate and name.
    """

    enabled: bool = False
    ca_file: Path | None = None
    """The CA certificate (PEM) that peers' certificates must be signed by."""

    cert_file: Path | None = None
    """This process's certificate chain (PEM), shown as server and as client."""

    key_file: Path | None = None
    """The private key (PEM) of ``cert_file``."""

    server_name_override: str | None = None
    """The name servers' certificates are checked against instead of the target's host."""

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TlsSettings:
        # Checked here, so that a wrong path stops a process at start-up with the setting's
        # name, not at its first connection.
        if not self.enabled:
            return self
        problems = []
        for name in ("ca_file", "cert_file", "key_file"):
            path: Path | None = getattr(self, name)
            setting = f"tls.{name} (PROFILEMESH_TLS__{name.upper()})"
            if path is None:
                problems.append(f"{setting} is not set")
            elif not path.is_file():
                problems.append(f"{setting} {path} is not a file")
        if problems:
            raise ValueError(f"tls.enabled needs its files: {'; '.join(problems)}")
        return self


class PostgresSettings(BaseModel):
    """The PostgreSQL server of the scale-out backend (every service's stores)."""

    dsn: str | None = None
    """A libpq connection string or URI, e.g. ``postgresql://profilemesh:...@db:5432/profilemesh``
    (from a Kubernetes Secret). Required when ``backend`` is ``postgres``."""

    pool_min: int = Field(default=1, ge=0)
    pool_max: int = Field(default=8, ge=2)
    """Connections per store: a transaction holds one and may read through another."""


class NatsSettings(BaseModel):
    """The NATS JetStream servers of the scale-out backend (every service's logs)."""

    url: str = "nats://127.0.0.1:4222"
    """One or more server URLs, comma-separated."""

    stream_prefix: str = "profilemesh"
    """Prefix of the JetStream streams, so that several meshes can share one NATS cluster."""

    replicas: int = Field(default=1, ge=1, le=5)
    """JetStream replicas of each stream (3 on a production cluster)."""


class AuthSettings(BaseModel):
    """Who may call the mesh: API tokens with scopes, checked on every call.

    On by default; switching it off is for local development only. Tokens are made with
    ``profilemesh tokens create`` and kept (hashed) by the identity service.
    """

    enabled: bool = True
    token: str | None = None
    """The token this process sends on its outbound calls (to other services, or from the
    CLI). Without one, ``<data_dir>/admin.token`` is sent when that file exists."""

    bootstrap_token: str | None = None
    """Identity only: a token with the ``admin`` scope, named ``bootstrap``, that identity
    makes sure it knows at start-up (how a fresh mesh gets its first token)."""

    cache_seconds: float = Field(default=30.0, ge=0)
    """How long the other services trust a token identity verified; a revocation takes
    effect within this time."""


class Settings(BaseSettings):
    """Everything a profilemesh process can be configured with."""

    model_config = SettingsConfigDict(
        env_prefix="PROFILEMESH_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Path(".profilemesh")
    """Where the embedded backend keeps each service's data (one folder per service)."""

    bind_host: str = "127.0.0.1"
    """The interface servers listen on; ``0.0.0.0`` in a container."""

    services: Endpoints = Endpoints()
    client: ClientSettings = ClientSettings()
    streams: StreamSettings = StreamSettings()
    ingestion: IngestionSettings = IngestionSettings()
    identity: IdentitySettings = IdentitySettings()
    features: FeaturesSettings = FeaturesSettings()
    activation: ActivationSettings = ActivationSettings()
    tls: TlsSettings = TlsSettings()
    auth: AuthSettings = AuthSettings()

    backend: Literal["embedded", "postgres"] = "embedded"
    """Where state and logs live: ``embedded`` (SQLite, DuckDB and log files under
    ``data_dir``; one machine) or ``postgres`` (PostgreSQL stores and NATS JetStream logs, for
    several replicas per service on Kubernetes)."""
    postgres: PostgresSettings = PostgresSettings()
    nats: NatsSettings = NatsSettings()

    grace_seconds: float = Field(default=5.0, ge=0)
    """On SIGTERM, how long in-flight calls may finish before they are cancelled."""

    max_message_mib: int = Field(default=16, ge=1, le=1024)
    """Largest gRPC message accepted or sent, in MiB."""

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    disabled_plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Plugin names never loaded (``PROFILEMESH_DISABLED_PLUGINS=a,b``)."""

    traces_exporter: Literal["none", "console", "otlp"] = Field(
        default="none", validation_alias=AliasChoices("OTEL_TRACES_EXPORTER", "traces_exporter")
    )
    """Standard ``OTEL_TRACES_EXPORTER``; ``none`` (the default here) installs no SDK: no cost."""

    service_name: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_SERVICE_NAME", "service_name")
    )
    """Standard ``OTEL_SERVICE_NAME``; defaults to ``profilemesh-<service>``."""

    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """When set, each service serves Prometheus' ``/metrics`` on this port (on ``bind_host``);
    ``profilemesh up`` gives the services this port and the next four, in the order of
    :data:`SERVICE_NAMES`. Unset (the default), no metrics SDK is installed: no cost."""

    @field_validator("disabled_plugins", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    def service_data_dir(self, service: str) -> Path:
        """The folder that belongs to one service under the data directory."""
        return self.data_dir / service

    def to_env(self) -> dict[str, str]:
        """These settings as ``PROFILEMESH_*`` variables, to hand to a child process."""
        env: dict[str, str] = {
            "PROFILEMESH_DATA_DIR": str(self.data_dir),
            "PROFILEMESH_BIND_HOST": self.bind_host,
            "PROFILEMESH_GRACE_SECONDS": str(self.grace_seconds),
            "PROFILEMESH_MAX_MESSAGE_MIB": str(self.max_message_mib),
            "PROFILEMESH_LOG_LEVEL": self.log_level,
            "PROFILEMESH_LOG_FORMAT": self.log_format,
            "PROFILEMESH_DISABLED_PLUGINS": ",".join(self.disabled_plugins),
            "OTEL_TRACES_EXPORTER": self.traces_exporter,
            "PROFILEMESH_BACKEND": self.backend,
        }
        if self.metrics_port is not None:
            env["PROFILEMESH_METRICS_PORT"] = str(self.metrics_port)
        for name in SERVICE_NAMES:
            endpoint = self.services.of(name)
            env[f"PROFILEMESH_SERVICES__{name.upper()}__HOST"] = endpoint.host
            env[f"PROFILEMESH_SERVICES__{name.upper()}__PORT"] = str(endpoint.port)
        groups = (
            ("CLIENT", self.client),
            ("STREAMS", self.streams),
            ("INGESTION", self.ingestion),
            ("IDENTITY", self.identity),
            ("TLS", self.tls),
            ("AUTH", self.auth),
            ("POSTGRES", self.postgres),
            ("NATS", self.nats),
        )
        for group, model in groups:
            for field in type(model).model_fields:
                value = getattr(model, field)
                if value is not None:
                    env[f"PROFILEMESH_{group}__{field.upper()}"] = str(value)
        return env
