"""spendstream.yaml: typed configuration, its defaults, and a loader whose errors name key and line.

Defaults live in the dataclass fields and nowhere else. The JSON Schema (`config.schema.json`)
rejects unknown keys and wrong types; `validate()` methods add the cross-field rules.
The guardrail sections (budgets, keys, velocity, breaker, downgrade) are kept as written and
typed once into `Config.policy` (schemas/policy.py).
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, cast

import jsonschema
import yaml

from schemas.content import is_content
from schemas.errors import ConfigError
from schemas.policy import Policy, policy_from_sections

#: Where each attribution dimension is read from, first match wins (span, then resource).
DEFAULT_DIMENSIONS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "team": ("team.name", "team", "gen_ai.team", "metadata.user_api_key_team_alias"),  # LiteLLM's
        "use_case": ("feature.name", "use_case", "gen_ai.use_case", "app.use_case"),
        "env": ("deployment.environment.name", "deployment.environment", "env"),
        "app": ("service.name",),
        "key": ("gen_ai.virtual_key", "virtual_key", "api_key.name", "metadata.user_api_key_alias"),
        "cost_center": ("cost_center", "cost.center"),
        "user": ("enduser.id", "user.id"),
        "tenant_tier": ("tenant.tier",),
    }
)
UNALLOCATED: Final = "unallocated"


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    partitions: int = 8
    replication_factor: int = 1
    #: zstd: 2x smaller than lz4 and cheaper to compress (aiokafka runs lz4 at level 9); it needs Kafka >= 2.1,
    #: the oldest broker Kafka 4.0's clients still talk to (KIP-896)
    compression: Literal["lz4", "gzip", "zstd", "snappy", "none"] = "zstd"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    #: name of the environment variable that holds the SASL password: secrets stay out of the file
    sasl_password_env: str | None = None
    ssl_cafile: str | None = None

    def validate(self) -> list[str]:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password_env):
            return [f"kafka.security_protocol: {self.security_protocol} needs kafka.sasl_mechanism, "
                    "kafka.sasl_username and kafka.sasl_password_env"]
        if not sasl and self.sasl_mechanism:
            return ["kafka.sasl_mechanism: set, but kafka.security_protocol is not SASL_PLAINTEXT or SASL_SSL"]
        return []

    def client_options(self, environ: Mapping[str, str]) -> dict[str, Any]:
        """Connection keyword arguments for aiokafka clients. Raises ConfigError if the password is unset."""
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                   "security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.security_protocol.startswith("SASL_"):
            password = environ.get(self.sasl_password_env or "")
            if not password:
                raise ConfigError([f"kafka.sasl_password_env: environment variable {self.sasl_password_env} "
                                   "is not set"], "environment")
            options |= {"sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                        "sasl_plain_password": password}
        return options


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """TLS on both OTLP receivers, named as in the OpenTelemetry Collector's `tls` block.

    With `client_ca_file`, clients must present a certificate signed by that CA (mutual TLS).
    Files are read when the collector starts, not when the config is loaded: the workers share
    the file and need not have the certificates.
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardConfig:
    """Processor mode: every span received is also sent on to a downstream OTLP endpoint, model calls enriched
    with their cost. Named as in the OpenTelemetry Collector's OTLP exporter and its `sending_queue`.

    `endpoint`: `host:port` for gRPC (TLS when `ca_file` is set), a URL such as `http://host:4318/v1/traces`
    for HTTP (TLS for https://). Forwarding never holds up cost accounting: spans wait in a bounded queue
    (`queue_spans`); what does not fit, or is still refused after `max_elapsed_s` of retries, is dropped and
    counted.
    """

    endpoint: str
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    headers: Mapping[str, str] = field(default_factory=dict)
    compression: Literal["gzip", "none"] = "gzip"
    ca_file: str | None = None
    cert_file: str | None = None  # with key_file: a client certificate (mutual TLS)
    key_file: str | None = None
    timeout_s: float = 5.0
    queue_spans: int = 100_000
    max_batch_spans: int = 2048
    retry_initial_s: float = 0.5
    retry_max_s: float = 5.0
    max_elapsed_s: float = 60.0
    #: prompt and completion content is stripped from forwarded spans unless this is on
    keep_content: bool = False

    def validate(self) -> list[str]:
        if (self.cert_file is None) != (self.key_file is None):
            return ["collector.forward.cert_file: cert_file and key_file go together (a client certificate)"]
        if self.protocol == "http/protobuf" and not self.endpoint.startswith(("http://", "https://")):
            return [f"collector.forward.endpoint: {self.endpoint!r} is not an http:// or https:// URL "
                    "(protocol http/protobuf)"]
        return []


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorConfig:
    #: Address the OTLP receivers listen on: loopback by default; 0.0.0.0 (all interfaces) is what a
    #: container or a collector other hosts send to needs, and then TLS and ingest tokens matter.
    host: str = "127.0.0.1"
    grpc_port: int = 4317
    http_port: int = 4318
    tls: TlsConfig | None = None
    #: Largest OTLP request accepted, as sent and once inflated (413 / RESOURCE_EXHAUSTED beyond it);
    #: a 1 MB attribute must fit with room to spare.
    max_request_bytes: int = 16 * 1024 * 1024
    #: Request bytes held at once over both transports; past it a request is answered "busy, retry later"
    #: (429 + Retry-After / UNAVAILABLE + RetryInfo). At least max_request_bytes.
    max_inflight_bytes: int = 64 * 1024 * 1024
    #: How long an OTLP call waits for the broker's acknowledgement before answering UNAVAILABLE.
    publish_timeout_s: float = 5.0
    max_events_per_message: int = 500
    #: Token counts above this are treated as corrupt, not as a real call.
    max_token_count: int = 1_000_000_000
    #: Attribution values and model names are cut to this many characters.
    max_value_chars: int = 256
    #: Event-time bounds: a model call that started more than `max_lateness_s` before it reached the
    #: collector, or more than `max_skew_s` after, is dead-lettered (`invalid_timestamp`) and never moves
    #: a watermark. 1 h covers an OTLP exporter's retries (the OTel Collector gives up after 5 min) and a
    #: batch that waited in an agent's queue; 5 min covers any host whose clock is kept by NTP.
    max_lateness_s: int = 3600
    max_skew_s: int = 300
    #: processor mode (off by default): forward every span, with its cost, to a downstream OTLP endpoint
    forward: ForwardConfig | None = None

    def validate(self) -> list[str]:
        problems = self.forward.validate() if self.forward else []
        if self.max_inflight_bytes < self.max_request_bytes:
            problems.append(f"collector.max_inflight_bytes: {self.max_inflight_bytes} is below "
                            f"collector.max_request_bytes ({self.max_request_bytes}): a request of the largest size "
                            "could never be accepted")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    port: int = 9464
    #: distinct values each traffic label (team, use_case, env, app, model) keeps; later ones count as `other`
    max_label_values: int = 50
    #: per-scope gauges (budgets, velocity, breakers) show the top N scopes; the rest are summed as `other`
    max_scopes: int = 50
    #: ceiling of series per metric family; beyond it a new label tuple is counted as `other`
    max_series: int = 2_000


@dataclass(frozen=True, slots=True, kw_only=True)
class FocusConfig:
    """Who the FOCUS rows are billed to: the organisation's account with its model providers."""

    billing_account_id: str = "spendstream"
    billing_account_name: str = "spendstream"
    #: the FOCUS version of the rows and files: 1.4 (all 65 Cost and Usage columns), or 1.2 for tools that
    #: still ingest 1.2 (ProviderName/PublisherName instead of ServiceProviderName/HostProviderName)
    version: Literal["1.4", "1.2"] = "1.4"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExporterConfig:
    #: request: one FOCUS row per call and meter; hour/day: also a rollup per charge period x SKU x attribution
    rollup: Literal["request", "hour", "day"] = "request"
    #: how long rows may wait before they are written; a file is durable before its offsets are committed
    flush_seconds: float = 5.0
    max_rows_per_file: int = 200_000
    #: rows held in memory at most, those being written included (~620 bytes a row): a full buffer is flushed,
    #: and nothing more is fetched until it is written, so memory does not grow with a burst
    max_buffered_rows: int = 100_000
    #: how often the exporter merges the small request files of closed charge dates into few (0: never;
    #: `spendstream compact` does it by hand)
    compact_every_s: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    #: usage ids are remembered this long in event time, so a retried span counts once; at least
    #: collector.max_lateness_s, so every span the collector accepts can be checked. Twice that by default: the
    #: horizon runs behind the stage's watermark, so a span accepted just within the lateness bound is still
    #: recognised as a retry while pricing lags behind by up to an hour (a backlog after an outage)
    dedupe_horizon_s: int = 7200


@dataclass(frozen=True, slots=True, kw_only=True)
class AttributionConfig:
    required: tuple[str, ...] = ("team", "use_case", "env")
    on_missing: Literal["allocate_unallocated", "reject"] = "allocate_unallocated"
    dimensions: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: DEFAULT_DIMENSIONS)
    #: The dimensions whose values form the Kafka key of a usage event.
    key_dimensions: tuple[str, ...] = ("team", "use_case", "env", "app", "key")
    #: user ids become HMAC-SHA256 pseudonyms keyed by the secret in this environment variable; while it is
    #: unset (and hash_user_ids is on) the user dimension is dropped rather than hashed without a key
    hash_user_ids: bool = True
    user_id_key_env: str = "SPENDSTREAM_USER_ID_KEY"

    def validate(self) -> list[str]:
        problems = [
            f"attribution.required: unknown dimension {name!r} (known: {', '.join(sorted(self.dimensions))})"
            for name in self.required
            if name not in self.dimensions
        ]
        problems += [
            f"attribution.key_dimensions: unknown dimension {name!r}"
            for name in self.key_dimensions
            if name not in self.dimensions
        ]
        problems += [
            f"attribution.dimensions.{dim}: {name!r} is a content attribute; prompts and completions "
            "never leave the collector"
            for dim, names in self.dimensions.items()
            for name in names
            if is_content(name)  # never a source of attribution values
        ]
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Who is calling, as gateways know it: `spendstream authz` and `spendstream gateway` read it, never what a
    client claims about itself."""

    #: virtual key (the gateway-verified `Authorization: Bearer` secret) -> the identity it stands for
    keys: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: dimension -> request header the gateway itself sets from its own authentication (and strips from clients)
    identity_headers: Mapping[str, str] = field(default_factory=dict)
    #: a caller with no configured key: refused (401), or let through with the required dimensions `unallocated`
    unknown_keys: Literal["deny", "unallocated"] = "deny"
    #: the `key` names (as in `keys`) an `approved_only` breaker lets through
    approved_keys: tuple[str, ...] = ()
    #: once the command follower died (new breakers no longer arrive): refuse every call (503), or decide from the
    #: breakers last known
    follower_lost: Literal["refuse", "last_known"] = "refuse"

    def validate(self, dimensions: Mapping[str, object]) -> list[str]:
        problems = [f"gateway.keys.{secret[:4]}…: unknown dimension {dim!r}"
                    for secret, identity in self.keys.items() for dim in identity if dim not in dimensions]
        # a key is read as the one word after `Bearer`: one with a blank or a comma could never be presented
        problems += [f"gateway.keys.{secret[:4]}…: a key has no blanks or commas" for secret in self.keys
                     if "," in secret or any(c.isspace() for c in secret)]
        problems += [f"gateway.identity_headers: unknown dimension {dim!r}"
                     for dim in self.identity_headers if dim not in dimensions]
        named = {identity.get("key") for identity in self.keys.values()}
        problems += [f"gateway.approved_keys: {name!r} is no key's `key` in gateway.keys"
                     for name in self.approved_keys if name not in named]
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    billing_currency: str = "USD"
    fx: Mapping[str, float] = field(default_factory=dict)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    #: bearer token -> the identity (dimension -> value) that token may claim
    ingest_tokens: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    #: the sections budgets, keys, velocity, breaker, downgrade and attribution.max_unallocated_share, typed
    policy: Policy = field(default_factory=Policy)
    pricing: Mapping[str, Any] = field(default_factory=dict)
    focus: FocusConfig = field(default_factory=FocusConfig)
    exporter: ExporterConfig = field(default_factory=ExporterConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)

    @property
    def usd_rate(self) -> Decimal:
        """Billing-currency units per USD, exact (the YAML number read as written)."""
        if self.billing_currency == "USD":
            return Decimal(1)
        return Decimal(str(self.fx["USD"]))

    def validate(self) -> list[str]:
        problems = self.attribution.validate() + self.kafka.validate() + self.collector.validate() \
            + self.gateway.validate(self.attribution.dimensions)
        if self.worker.dedupe_horizon_s < self.collector.max_lateness_s:
            problems.append(f"worker.dedupe_horizon_s: {self.worker.dedupe_horizon_s} is shorter than collector."
                            f"max_lateness_s ({self.collector.max_lateness_s}): a late retry could count twice")
        if self.billing_currency != "USD" and "USD" not in self.fx:
            problems.append(
                f"fx: billing_currency is {self.billing_currency} but fx has no USD rate "
                "(prices are published in USD)"
            )
        for token, identity in self.ingest_tokens.items():
            problems += [
                f"ingest_tokens.{token[:4]}…: unknown dimension {dim!r}"
                for dim in identity
                if dim not in self.attribution.dimensions
            ]
        return problems


def config_schema() -> dict[str, Any]:
    text = resources.files("schemas").joinpath("config.schema.json").read_text("utf-8")
    return cast(dict[str, Any], json.loads(text))


def _line_of(node: yaml.Node | None, path: Sequence[str | int]) -> int | None:
    """1-based line of the YAML node at `path`, or of its deepest existing ancestor."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = node.value[part]
        else:
            match = None
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _schema_problems(data: Any, root: yaml.Node | None) -> list[str]:
    validator = jsonschema.Draft202012Validator(config_schema())
    problems = []
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        message = err.message
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = err.schema.get("properties", {})
            extra = [k for k in err.instance if k not in allowed]
            message = f"unknown key(s) {', '.join(map(repr, extra))}"
            if extra:
                path = [*path, extra[0]]
        if err.validator == "enum" and isinstance(err.instance, int | float) and not isinstance(err.instance, bool) \
                and str(err.instance) in err.validator_value:  # `version: 1.2`: YAML read a number
            message += f'; YAML read a number: write it quoted, "{err.instance}"'
        line = _line_of(root, path)
        where = f" (line {line})" if line else ""
        problems.append(f"{_dotted(path)}{where}: {message}")
    return problems


_PROBLEM_PATH = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*|\[\d+\])*)(?=: )")


def _with_line(problem: str, root: yaml.Node | None) -> str:
    """`budgets[0].scope: …` -> `budgets[0].scope (line 7): …` when the path is in the file."""
    match = _PROBLEM_PATH.match(problem)
    if root is None or match is None:
        return problem
    path: list[str | int] = [int(p) if p.isdigit() else p for p in re.findall(r"[A-Za-z_]\w*|\d+", match.group(1))]
    line = _line_of(root, path)
    return f"{match.group(1)} (line {line}){problem[match.end():]}" if line and path[0] in _top_keys(root) else problem


def _top_keys(root: yaml.Node) -> set[str]:
    return {k.value for k, _ in root.value} if isinstance(root, yaml.MappingNode) else set()


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    """Build a validated Config from plain data. Raises ConfigError listing every problem."""
    problems = _schema_problems(data, None)
    if problems:
        raise ConfigError(problems, source)
    return _build(data, source)


_SECTIONS: Final[Mapping[str, type]] = MappingProxyType({
    "kafka": KafkaConfig, "collector": CollectorConfig, "metrics": MetricsConfig, "focus": FocusConfig,
    "exporter": ExporterConfig, "worker": WorkerConfig})


def _build(data: Mapping[str, Any], source: str, root: yaml.Node | None = None) -> Config:
    attribution = dict(data.get("attribution", {}))
    if "dimensions" in attribution:
        # configured names extend the defaults: a dimension named here replaces its default list
        attribution["dimensions"] = MappingProxyType(
            {**DEFAULT_DIMENSIONS, **{k: tuple(v) for k, v in attribution["dimensions"].items()}}
        )
    for key in ("required", "key_dimensions"):
        if key in attribution:
            attribution[key] = tuple(attribution[key])
    attribution.pop("max_unallocated_share", None)  # a guardrail: typed into the policy
    salt_problems = [] if attribution.pop("user_id_salt", None) is None else [
        "attribution.user_id_salt: no longer used: user ids are hashed with HMAC-SHA256 keyed by the secret in "
        "the environment variable attribution.user_id_key_env names (default SPENDSTREAM_USER_ID_KEY); remove "
        "this key and set the variable (docs/configuration.md, \"User ids\")"]
    policy, policy_problems = policy_from_sections(data, list(attribution.get("dimensions", DEFAULT_DIMENSIONS)))
    # a key absent from the file keeps its dataclass default: defaults live in one place
    sections: dict[str, Any] = {name: kind(**data[name]) for name, kind in _SECTIONS.items()
                                if name in data and name != "collector"}
    if "collector" in data:
        collector = dict(data["collector"])
        if collector.get("tls") is not None:
            collector["tls"] = TlsConfig(**collector["tls"])
        if collector.get("forward") is not None:
            forward = dict(collector["forward"])
            forward["headers"] = MappingProxyType(dict(forward.get("headers") or {}))
            collector["forward"] = ForwardConfig(**forward)
        sections["collector"] = CollectorConfig(**collector)
    sections |= {name: dict(data[name]) for name in ("fx", "pricing") if name in data}
    if "billing_currency" in data:
        sections["billing_currency"] = data["billing_currency"]
    if "ingest_tokens" in data:
        sections["ingest_tokens"] = {k: dict(v) for k, v in data["ingest_tokens"].items()}
    if "gateway" in data:
        gateway = dict(data["gateway"])
        gateway["keys"] = {k: dict(v) for k, v in gateway.get("keys", {}).items()}
        gateway["approved_keys"] = tuple(gateway.get("approved_keys", ()))
        sections["gateway"] = GatewayConfig(**gateway)
    config = Config(attribution=AttributionConfig(**attribution), policy=policy, **sections)
    problems = salt_problems + config.validate() + policy_problems
    if problems:
        raise ConfigError([_with_line(p, root) for p in problems], source)
    return config


def _merge(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with `overrides` laid over it key by key: a section named in both keeps the file's other keys."""
    merged = dict(data)
    for key, value in overrides.items():
        below = merged.get(key)
        merged[key] = _merge(below if isinstance(below, Mapping) else {}, value) if isinstance(value, Mapping) \
            else value
    return merged


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a spendstream.yaml, with `overrides` (shaped like the file: schemas/config_env.py) laid
    over it; None gives the defaults.

    Raises ConfigError with one `key (line N): problem` entry per problem found.
    """
    if path is None:
        return config_from_dict(overrides, "environment") if overrides else Config()
    source = str(path)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read file: {exc.strerror}"], source) from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source) from exc
    if data is None:
        data = {}
    if overrides and isinstance(data, Mapping):
        data = _merge(data, overrides)
    problems = _schema_problems(data, root)
    if problems:
        raise ConfigError(problems, source)
    return _build(data, source, root)
