"""Where a node lives on disk and how it is configured.

A node home is one directory: ``config.toml``, ``identity.key`` and the data
the node keeps (store, audit log, trust store). ``--home DIR`` or
``RADMESH_HOME`` choose it, so several nodes can run on one machine; the
default is the platform's data directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs
import tomli_w

from node.core.errors import ConfigError, HomeError
from node.core.private import private_dir

HOME_ENV = "RADMESH_HOME"
CONFIG_NAME = "config.toml"
KEY_NAME = "identity.key"
# What the node's record tells others: at the desk now, reachable on call, or not taking
# cases (the values of registry.records.Availability).
AVAILABILITY = ("online", "on_call", "away")


def parse_availability(text: str) -> str:
    """``on-call``, ``On call`` and ``on_call`` all mean on_call."""
    value = text.strip().lower().replace("-", "_").replace(" ", "_")
    if value not in AVAILABILITY:
        raise ConfigError(
            f"availability {text[:20]!r} is not one of {', '.join(AVAILABILITY)} "
            "(on-call works too)"
        )
    return value


def default_home() -> Path:
    return Path(platformdirs.user_data_dir("radmesh", appauthor=False))


def resolve_home(explicit: str | os.PathLike[str] | None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return default_home()


@dataclass
class DicomConfig:
    ae_title: str = "RADMESH"
    host: str = "127.0.0.1"
    port: int = 11112
    enabled: bool = False
    # Calling AE titles allowed to send to the node, from any address the listener
    # reaches; empty (and `allowed` empty) refuses everyone.
    allowed_calling_aets: list[str] = field(default_factory=list)
    # "AE@address" pairs: that calling AE title only from that IP address (the PACS's).
    allowed: list[str] = field(default_factory=list)
    pacs_host: str = ""
    pacs_port: int = 0
    pacs_ae_title: str = ""
    # The node answers C-FIND / C-GET / C-MOVE from its store to the allowed callers.
    query_retrieve: bool = True
    # C-MOVE destinations, "AE@host:port": a request names only the AE title.
    move_destinations: list[str] = field(default_factory=list)


@dataclass
class NetworkConfig:
    registries: list[str] = field(default_factory=list)
    # ICE servers come only from here or from registries, never aiortc's default.
    ice_servers: list[str] = field(default_factory=list)
    # For the turn: URLs above, when the TURN server has static users (coturn -u); a registry
    # started with --turn-secret hands out short-lived ones by itself.
    turn_username: str = ""
    turn_password: str = ""
    mdns: bool = True
    mdns_interfaces: list[str] = field(default_factory=list)  # empty: all interfaces
    # Loopback unless the site chooses an address (or "0.0.0.0" for all) for the LAN
    # endpoint that peers on the same network reach.
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    # A CA (PEM) trusted for the registries' TLS besides the system's, for a registry with
    # a private or self-signed certificate (`radmesh registry add URL --ca FILE`).
    registry_ca_file: str = ""


@dataclass
class AlertsConfig:
    """Report acknowledgement and critical results (see consult.alerts, node.app.alerts)."""

    # Run (never through a shell) when a critical result arrives and at each escalation,
    # e.g. ["/usr/local/bin/page-oncall", "{consult}"]: "{consult}" becomes the consult id
    # (no patient data), and "--escalation K" is appended from the first escalation on.
    critical_command: list[str] = field(default_factory=list)
    command_timeout_seconds: int = 10
    # A report not acknowledged this long after it arrived is flagged.
    ack_routine_minutes: int = 60
    ack_urgent_minutes: int = 30
    ack_stat_minutes: int = 15
    ack_critical_minutes: int = 15
    # An unacknowledged critical result: the consultant's node re-sends it, the hospital's
    # node escalates (command again, louder banner), every repeat_minutes, at most
    # max_repeats times.
    critical_repeat_minutes: int = 5
    critical_max_repeats: int = 6

    def __post_init__(self) -> None:
        if not all(isinstance(part, str) and part for part in self.critical_command):
            raise ConfigError(
                "[alerts] critical_command must be a list of non-empty strings: the program "
                'and its arguments, e.g. ["/usr/local/bin/page", "{consult}"]'
            )
        at_least = {"command_timeout_seconds": 1, "critical_repeat_minutes": 1}
        for name, value in vars(self).items():
            if isinstance(value, int) and value < at_least.get(name, 0):
                raise ConfigError(f"[alerts] {name} must be at least {at_least.get(name, 0)}")


@dataclass
class SharingConfig:
    """De-identification options a site turns on knowingly (PS3.15 Annex E); all off by
    default. Clean Descriptors keeps study/series descriptions with names, ids and
    numbers removed; the retain options keep device or institution names."""

    clean_descriptors: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False


@dataclass
class RetentionConfig:
    """How long a consultant keeps a study received for a consult (node.app.retention)."""

    days: int = 30  # after the consult closes; 0 keeps studies forever

    def __post_init__(self) -> None:
        if not 0 <= self.days <= 36_500:
            raise ConfigError(
                f"[retention] days must be between 0 (keep forever) and 36500, not {self.days}"
            )


@dataclass
class NodeConfig:
    display_name: str = "radmesh node"
    institution: str = ""
    country: str = ""
    roles: list[str] = field(default_factory=list)
    subspecialties: list[str] = field(default_factory=list)
    jurisdictions: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=lambda: ["en"])
    timezone: str = "UTC"
    availability: str = "online"  # see AVAILABILITY; `radmesh status --set` changes it
    dicom: DicomConfig = field(default_factory=DicomConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    def to_toml(self) -> str:
        return tomli_w.dumps(asdict(self))

    @classmethod
    def from_toml(cls, text: str, source: str = CONFIG_NAME) -> NodeConfig:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
        config: NodeConfig = _build(cls, raw, source)
        try:
            config.availability = parse_availability(config.availability)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return config


def _build(cls: type[Any], raw: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in raw.items():
        expected = getattr(defaults, name)
        if isinstance(
            expected,
            DicomConfig | NetworkConfig | AlertsConfig | SharingConfig | RetentionConfig,
        ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{name}] must be a table")
            kwargs[name] = _build(type(expected), value, f"{where} [{name}]")
        elif type(value) is not type(expected):
            raise ConfigError(
                f"{where}: {name} must be {type(expected).__name__}, not {type(value).__name__}"
            )
        else:
            kwargs[name] = value
    return cls(**kwargs)


@dataclass(frozen=True)
class NodeHome:
    """Paths inside one node's home directory."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def key_path(self) -> Path:
        return self.root / KEY_NAME

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def trust_db(self) -> Path:
        """The trust store, shared by the running node and `radmesh trust` / `peers`."""
        return self.data_dir / "trust.db"

    @property
    def cert_path(self) -> Path:
        """This node's organisation certificate (`radmesh org install`), published in its
        record."""
        return self.root / "node.cert"

    @property
    def peers_db(self) -> Path:
        """The peer directory (remembered records)."""
        return self.data_dir / "peers.db"

    def exists(self) -> bool:
        return self.config_path.is_file() and self.key_path.is_file()

    def require(self) -> None:
        if not self.root.is_dir():
            raise HomeError(
                f"no radmesh node at {self.root}: run `radmesh --home {self.root} init` first"
            )
        if not self.exists():
            raise HomeError(
                f"{self.root} is not a complete radmesh home (config.toml or identity.key "
                "missing): run `radmesh init` there, or point --home at the right directory"
            )

    def load_config(self) -> NodeConfig:
        self.require()
        return NodeConfig.from_toml(self.config_path.read_text(), str(self.config_path))

    def save_config(self, config: NodeConfig) -> None:
        private_dir(self.root)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config.to_toml())
        tmp.replace(self.config_path)
