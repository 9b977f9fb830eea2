"""The one config loader: shipped YAML defaults, an optional file, env overrides.

Config is typed (msgspec Structs, frozen) so that a wrong type or an unknown key
fails at start-up with the key named, never at the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from triplane.runtime.retry import RetryPolicy

ENV_PREFIX = "TRIPLANE__"


class ConfigError(Exception):
    """Raised when configuration is invalid; the message names the key."""


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class TlsConfig(_Strict, frozen=True):
    # Mutual TLS on every gRPC server and channel (triplane/runtime/tls.py);
    # `runtime.tls: off` is short for `runtime.tls.enabled: false`.
    enabled: bool
    # PEM files; empty: under <state_dir>/tls/ (ca.crt, <identity>.crt/.key).
    ca_path: str
    cert_path: str
    key_path: str
    # How often a client looks for rotated files (servers look at every handshake).
    reload_check_interval_s: float
    # How long calls in flight on a channel replaced after a rotation get.
    rotation_close_grace_s: float
    # Peer certificates whose identity is remembered (parsed once each).
    peer_cache_entries: int
    # SPIFFE trust domain of the certificates the dev CA issues.
    trust_domain: str
    # Lifetime of the certificates the dev CA issues (`triplane certs dev`).
    dev_cert_days: int
    # Role named in the planes' permission tables -> the certificate
    # identities (URI SANs) that play it.
    roles: dict[str, list[str]]


class GrpcClientConfig(_Strict, frozen=True):
    # Every channel to a plane (triplane/runtime/tls.py channel_options):
    # round_robin spreads calls over every address the target resolves to
    # (dns:/// a headless Service); pick_first keeps to one.
    load_balancing: str
    # gRPC's retryPolicy on UNAVAILABLE, for the idempotent methods only;
    # maximum_attempts 1..5 (gRPC's cap; 1: no retries), jitter_s unused
    # (gRPC draws each wait in [0, backoff]).
    retry: RetryPolicy
    # Every plane's server: after this many seconds a connection is asked to
    # close (GOAWAY; calls in flight get max_connection_age_grace_s), so a
    # client reconnects, re-resolves its dns:/// target and reaches replicas
    # that came up since (round_robin only learns addresses on re-resolution).
    # 0: connections live until a side closes them.
    max_connection_age_s: float
    max_connection_age_grace_s: float


class RuntimeConfig(_Strict, frozen=True):
    state_dir: str
    log_level: str
    log_format: str
    shutdown_grace_s: float
    otel_exporter: str
    max_message_bytes: int
    gc_gen0_threshold: int
    event_loop: str
    tls: TlsConfig
    # Server reflection on the planes' ports (the gateway's: gateway.reflection).
    reflection: bool
    # host:port of a plaintext port serving only grpc.health.v1 (Kubernetes
    # gRPC probes cannot present a client certificate); empty: none.
    health_listen: str
    grpc: GrpcClientConfig


class StreamLimitsConfig(_Strict, frozen=True):
    # Size of the stream on disk (JetStream reserves it when the stream is made).
    max_bytes: int
    # How long an event is kept for replay and backfill.
    max_age_s: int
    # Largest event the stream takes.
    max_msg_bytes: int
    # Events kept per subject (one tenant's one event kind), oldest dropped
    # first; -1: no bound.
    max_msgs_per_subject: int
    # When the stream is full: "new" refuses the publish, "old" drops the
    # oldest events.
    discard: Literal["new", "old"]


class NatsStreamsConfig(_Strict, frozen=True):
    money: StreamLimitsConfig
    policy: StreamLimitsConfig
    ai: StreamLimitsConfig
    gateway: StreamLimitsConfig
    # The tenant registry (triplane/runtime/tenants.py).
    tenants: StreamLimitsConfig


class TenantDirectoryConfig(_Strict, frozen=True):
    # Tenants known to exist, remembered (least recently used dropped).
    known_entries: int
    # Tenants found not to exist, remembered this long, at most this many.
    unknown_ttl_s: float
    unknown_entries: int


class NatsConfig(_Strict, frozen=True):
    url: str
    connect_timeout_s: float
    publish_timeout_s: float
    dedupe_window_s: int
    stream_replicas: int
    # Bounds of each stream of the spine (triplane/runtime/bus.py).
    streams: NatsStreamsConfig
    # Who reads the tenant registry: the gateway and the AI plane.
    tenant_directory: TenantDirectoryConfig
    # TLS to NATS (all empty: plaintext unless the url says tls://): the CA
    # bundle, and a client certificate when the server verifies clients.
    tls_ca_path: str
    tls_cert_path: str
    tls_key_path: str
    # Credentials: a NATS .creds file (JWT + nkey seed), or a user and a file
    # holding the password (a Kubernetes Secret), never the password itself.
    creds_file: str
    user: str
    password_file: str


class KeysConfig(_Strict, frozen=True):
    # Decision tokens: the public keys the money plane trusts (inline base64,
    # and files or directories of files, re-read when they change) and the
    # policy plane's signing key file.
    policy_public_keys: list[str]
    policy_public_key_paths: list[str]
    policy_private_key_path: str
    # The decision log's own signing key file, and earlier log keys (inline,
    # files) kept to verify records signed before a rotation.
    decision_log_private_key_path: str
    decision_log_public_keys: list[str]
    decision_log_public_key_paths: list[str]


class MoneyShardConfig(_Strict, frozen=True):
    """One database of the tenant-sharded ledger. The DSN is a secret: leave
    it out of config maps and give it as TRIPLANE_MONEY_DSN_<NAME> (the name
    upper-cased) or a file (postgres_dsn_file, e.g. a mounted Secret)."""

    name: str
    postgres_dsn: str = ""
    postgres_dsn_file: str = ""


class MoneyStoreConfig(_Strict, frozen=True):
    backend: str
    sqlite_path: str
    postgres_dsn: str
    postgres_pool_size: int
    # A group commit that lost a race with another writer (bounded: a request waits).
    conflict_retry: RetryPolicy
    # Tenant shards (PostgreSQL); empty: one database (postgres_dsn or sqlite_path).
    shards: list[MoneyShardConfig] = msgspec.field(default_factory=list)


class GroupCommitConfig(_Strict, frozen=True):
    max_batch_transfers: int
    max_wait_ms: float
    workers: int
    max_queue_transfers: int


class MoneyLimitsConfig(_Strict, frozen=True):
    max_transfers_per_request: int
    max_accounts_per_request: int
    max_splits_per_transfer: int
    max_id_length: int
    max_string_length: int
    max_metadata_entries: int
    default_page_size: int
    max_page_size: int


class HoldsConfig(_Strict, frozen=True):
    default_timeout_s: int
    max_timeout_s: int
    expiry_sweep_interval_s: float
    expiry_sweep_batch: int


class ReservesConfig(_Strict, frozen=True):
    release_sweep_interval_s: float
    release_sweep_batch: int
    refused_retry_s: int


class OutboxConfig(_Strict, frozen=True):
    relay_batch_size: int
    relay_idle_poll_ms: float
    # An idle relay's reads back off, doubling from relay_idle_poll_ms up to
    # this (triplane.runtime.outbox.RelaySettings.idle_poll_s).
    relay_idle_max_ms: float
    # Connecting to and publishing on JetStream (until cancelled: a relay never gives up).
    relay_retry: RetryPolicy
    sent_retention_s: int
    cleanup_interval_s: float


class TokensConfig(_Strict, frozen=True):
    clock_skew_s: int
    # How often the trusted key files are checked for a change.
    key_reload_interval_s: float
    # Used token ids are kept this long past their token's expiry (then any
    # presentation is refused as expired anyway); more than clock_skew_s.
    used_retention_s: int
    purge_interval_s: float
    purge_batch: int


class ReconSlaTierConfig(_Strict, frozen=True):
    # A break of at least this amount (minor units, any currency) is in this
    # tier; past `hours` of age it escalates to the next tier up.
    name: str
    min_amount_minor: int
    hours: float


def _default_sla_tiers() -> list[ReconSlaTierConfig]:
    return [
        ReconSlaTierConfig(name="P1", min_amount_minor=1_000_000, hours=4),
        ReconSlaTierConfig(name="P2", min_amount_minor=10_000, hours=24),
        ReconSlaTierConfig(name="P3", min_amount_minor=0, hours=72),
    ]


class ReconConfig(_Strict, frozen=True):
    """Reconciliation (money_plane/recon): matching tolerances, breaks' grace,
    owners and SLA tiers."""

    # A bank line's amount may differ from an expected payment's bounds by this
    # much and still match (minor units).
    amount_tolerance_minor: int = 0
    # How far (days) a line's booking date may fall outside an expected
    # payment's date window and still match on amount and date alone.
    date_window_days: int = 2
    # Days past an expected payment's window before it is late (a line that
    # comes then matches and raises `late`) or unmatched (none came).
    grace_days: int = 1
    # Widest gap allowed between an expected payment's amount and either of
    # its bounds (so the amount-window search stays an index range).
    max_bound_spread_minor: int = 50_000
    # The statement's booked balances checked against the ledger's balance of
    # the bank account at the end of the closing balance's day.
    check_ledger_balance: bool = True
    # Who owns a break, by class; others go to default_owner.
    default_owner: str = "treasury-ops"
    owners: dict[str, str] = msgspec.field(default_factory=dict)
    # Highest first: a break takes the first tier its amount reaches.
    sla_tiers: list[ReconSlaTierConfig] = msgspec.field(default_factory=_default_sla_tiers)
    # The ledger account a write-off posts against (opened by the operator).
    write_off_account_id: str = "recon-write-off"
    # Largest statement file accepted, and the most lines one import takes.
    max_file_bytes: int = 64 * 1024 * 1024
    max_lines_per_file: int = 200_000
    # How often expected payments left without a booking are swept into
    # unmatched breaks for the days no end-of-day statement closed; 0: never.
    sweep_interval_s: float = 300.0
    # The statement intake (money_plane/recon/intake.py; where sweepers run,
    # one replica at a time; off when rails.bank_url is empty): how often the
    # bank's statements feed (a camt.054 per booking) and closed days'
    # camt.053 are read; 0: never.
    intake_interval_s: float = 10.0
    # On first start, the end-of-day statements of this many closed days back.
    intake_days_back: int = 3
    # Bank accounts whose postings the sweep ages into unmatched_ledger breaks
    # when no statement line matched them by date_window_days + grace_days
    # after posting: those a statement was imported for, and those whose
    # metadata role is one of these.
    bank_account_roles: list[str] = msgspec.field(default_factory=lambda: ["payouts_bank", "bank"])
    # How far back (days before that age) each sweep looks for such postings.
    unmatched_posting_lookback_days: int = 14
    # Postings of entries whose idempotency key is LIKE one of these are
    # reconciled another way (a payout's settlement and reversal through its
    # expected payment; a break's own write-off or reversal) and never aged.
    unmatched_posting_skip_keys: list[str] = msgspec.field(
        default_factory=lambda: ["payout-settle:%", "payout-reverse:%", "recon-%"]
    )
    # The ledger-balance check's payments in transit: a bank account's
    # posting whose entry's idempotency key starts with a key here is booked
    # when the expected payment <value><rest of the key> is (a payout's
    # settlement and its expected payment).
    in_transit_expected_keys: dict[str, str] = msgspec.field(
        default_factory=lambda: {"payout-settle:": "payout:", "payout-reverse:": "payout:"}
    )


class PayoutsConfig(_Strict, frozen=True):
    """Payouts (money_plane/payouts; README "Payouts and settlement")."""

    # The ledger accounts a payout moves through, one per currency,
    # "<prefix>:<currency>", opened by the money plane on first use: the
    # merchant's money waits in in-flight until the rail settles it (then it
    # goes to the bank account) or returns it (then back to the merchant).
    in_flight_account_prefix: str = "payouts_in_flight"
    bank_account_prefix: str = "payouts_bank"
    # How often the settlement sweeper runs (every replica may: a period's
    # claim makes it settle once).
    settlement_sweep_interval_s: float = 30.0
    # Key ring (base64 AES-256 keys, one a line, the sealing key first)
    # sealing beneficiaries' account numbers and names at rest; a Kubernetes
    # Secret in a cluster. Empty: a dev key ring under state_dir/keys.
    keys_path: str = ""


class MoneyConfig(_Strict, frozen=True):
    listen: str
    # host:port of the Prometheus metrics endpoint; empty: not served.
    metrics_listen: str
    server_processes: int
    budget_ms: float
    store: MoneyStoreConfig
    group_commit: GroupCommitConfig
    limits: MoneyLimitsConfig
    holds: HoldsConfig
    reserves: ReservesConfig
    outbox: OutboxConfig
    tokens: TokensConfig
    recon: ReconConfig = msgspec.field(default_factory=ReconConfig)
    payouts: PayoutsConfig = msgspec.field(default_factory=PayoutsConfig)


class PolicyStoreConfig(_Strict, frozen=True):
    backend: str
    sqlite_path: str
    postgres_dsn: str
    # Connections for reads beside the writer's (0: reads share the writer's).
    read_connections: int = 2


class PolicyLimitsConfig(_Strict, frozen=True):
    max_id_length: int
    max_string_length: int
    max_name_length: int
    max_features: int
    # Split legs of one Evaluate request (the token binds their digest).
    max_splits: int
    max_rules_per_bundle: int
    max_bundle_bytes: int
    max_bundle_depth: int
    max_parameter_items: int
    max_parameter_string_length: int
    max_condition_chars: int
    max_condition_nodes: int
    max_condition_nesting: int
    max_comprehension_nesting: int
    max_sanctions_entries: int
    max_sanctions_name_length: int
    default_page_size: int
    max_page_size: int
    max_replay_decisions: int
    max_changed_decisions_listed: int
    max_offers_per_tenant: int
    max_offer_channels: int
    max_offer_attributes: int
    max_offer_attribute_length: int
    max_contact_history_per_customer: int
    max_note_length: int
    # Changes of a customer profile listed by GetCustomerProfile, newest first.
    max_profile_changes_listed: int


class DecisionLogConfig(_Strict, frozen=True):
    chain_id: str
    max_batch_records: int
    max_wait_ms: float
    max_queue_records: int
    retention_days: int
    retention_sweep_interval_s: float
    replay_page_records: int
    # An append that lost a race for an idempotency key (bounded: a decision waits).
    write_retry: RetryPolicy
    # Replay across processes (0: one per core; 1: in process), beyond the
    # first replay_parallel_min_decisions decisions of a window.
    replay_workers: int = 0
    replay_parallel_min_decisions: int = 100000
    # Empty: every writer appends to chain_id (serialized by a row lock);
    # set per replica: its own chain <chain_id>-<writer_id>, no lock shared.
    writer_id: str = ""


class PolicyBundlesConfig(_Strict, frozen=True):
    default_path: str
    lists_dir: str
    kv_bucket: str
    kv_key: str
    kv_watch: bool
    # How often each replica reads the store's live and shadow slots and
    # follows a switch another replica made (seconds; 0: never).
    follow_interval_s: float
    compiled_cache_size: int


class SanctionsConfig(_Strict, frozen=True):
    hit_threshold: float
    possible_match_threshold: float


class ConsentConfig(_Strict, frozen=True):
    default_time_zone: str
    quiet_hours_start: str
    quiet_hours_end: str
    quiet_hours_topics: list[str]
    max_contacts_per_day: int
    max_contacts_per_channel_per_day: int
    default_offer_cooldown_s: int
    vulnerable_blocked_topics: list[str]
    vulnerable_blocked_products: list[str]


class PolicyOutboxConfig(_Strict, frozen=True):
    relay_batch_size: int
    relay_interval_s: float
    relay_retry: RetryPolicy


class PolicyPiiConfig(_Strict, frozen=True):
    # File holding the key ring (base64 AES-256 keys, one a line, the sealing
    # key first) that seals the names kept in the decision log; a Kubernetes
    # Secret in a cluster. Empty: a dev key ring under state_dir/keys.
    keys_path: str


class PolicyConfig(_Strict, frozen=True):
    listen: str
    # host:port of the Prometheus metrics endpoint; empty: not served.
    metrics_listen: str
    budget_ms: float
    token_ttl_s: int
    store: PolicyStoreConfig
    limits: PolicyLimitsConfig
    decision_log: DecisionLogConfig
    bundles: PolicyBundlesConfig
    sanctions: SanctionsConfig
    consent: ConsentConfig
    outbox: PolicyOutboxConfig
    pii: PolicyPiiConfig


class AiTritonConfig(_Strict, frozen=True):
    startup_timeout_s: float
    stop_timeout_s: float
    score_timeout_ms: float
    queue_timeout_us: int
    max_queue_delay_us: int
    max_batch_size: int
    max_queue_size: int
    instance_count: int
    load_timeout_s: float


class AiBreakerConfig(_Strict, frozen=True):
    failure_threshold: int
    failure_rate: float
    window_s: float
    open_s: float


class AiFallbackConfig(_Strict, frozen=True):
    in_process: bool
    last_good: bool
    last_good_ttl_s: int
    last_good_max_entries: int


class AiFeaturesConfig(_Strict, frozen=True):
    backend: str
    namespace: str
    redis_url: str
    aerospike_hosts: str
    aerospike_namespace: str
    aerospike_set: str
    dedupe_ttl_s: int
    in_process_max_keys: int
    read_timeout_ms: float


class AiPipelineConfig(_Strict, frozen=True):
    enabled: bool
    durable_name: str
    batch_size: int
    fetch_timeout_s: float
    ack_wait_s: float
    max_deliver: int
    backfill_batch_size: int
    backfill_max_events: int


class AiModelsConfig(_Strict, frozen=True):
    dir: str
    bootstrap_train: bool
    seed: int
    training_customers: int
    training_days: int
    num_boost_round: int
    num_leaves: int


class AiLimitsConfig(_Strict, frozen=True):
    max_id_length: int
    max_attributes: int
    max_attribute_length: int
    max_candidates: int
    max_top_k: int
    default_top_k: int
    explain_cache_entries: int
    default_page_size: int
    max_page_size: int


class AiBanditConfig(_Strict, frozen=True):
    prior_variance: float
    noise_variance: float
    probability_samples: int
    seed: int
    max_pending_ranks: int
    max_outcome_ids: int
    # Offers (per tenant) whose learned posterior is kept; beyond, the least
    # recently updated falls back to the prior.
    max_arms: int
    # Where Rank keeps what ReportOutcome needs (rank id -> tenant, features
    # of each ranked offer): in_process, redis, or auto (redis when
    # ai.features.backend is redis, else in_process). Above one replica it
    # must be redis: an outcome may reach any replica.
    pending_store: str = "auto"
    # Empty: ai.features.redis_url.
    pending_redis_url: str = ""
    pending_ttl_s: int = 86400
    # spine: outcomes go through the TRIPLANE_AI stream and every replica
    # learns each one (needs nats.url); local: the replica that got it only.
    outcomes: str = "spine"
    # How often the posterior is snapshotted (NATS object store) with the
    # stream sequence it covers; also at shutdown. 0: only at shutdown.
    snapshot_interval_s: float = 60.0
    # Longest ReportOutcome waits for its outcome to come back from the spine.
    apply_timeout_s: float = 5.0


class AiLearnerConfig(_Strict, frozen=True):
    """The offer learner (ai_plane/learner.py, issue 13)."""

    # thompson: the linear Thompson bandit over the propensity model's fixed
    # context (ai_plane/bandit.py); vw: Vowpal Wabbit's --cb_explore_adf per
    # tenant, on the request's context and the offers' catalog entries.
    engine: str = "vw"
    # vw's exploration: squarecb (gamma_scale) or epsilon (epsilon-greedy).
    exploration: str = "squarecb"
    gamma_scale: float = 10.0
    epsilon: float = 0.05
    # Hashed feature space: 2^bits weights per model.
    bits: int = 18
    seed: int = 11
    # Models kept in memory (about 9 MB each at 18 bits); beyond, the least
    # recently used is kept as its saved bytes and reloaded on use.
    max_live_models: int = 32
    # Surfaces that learn apart from the rest of their tenant's surfaces.
    surfaces_apart: list[str] = []
    # value: a conversion's reward is value x lever / value_scale_minor;
    # conversion: lever only (every conversion worth the same).
    objective: str = "value"
    # A typical conversion's value: rewards near 1 (SquareCB's exploration
    # is tuned to the reward's scale: at 0.1 per conversion it explored far
    # too long and lost to Vowpal Wabbit fed 0/1 on the same stream).
    value_scale_minor: int = 1000
    # The value of an offer without one (minor units).
    default_value_minor: int = 1000
    max_reward: float = 100.0
    # Reward of an explicit negative (dismissed or declined).
    dismissed_reward: float = 0.0
    # No outcome within this long after the ranking: reward 0, once.
    reward_window_s: int = 3600
    # How often a replica looks for rankings whose window closed.
    sweep_interval_s: float = 5.0
    # Rankings whose reward is remembered (one reward per ranking).
    max_rewarded_ranks: int = 200000


class AiDriftConfig(_Strict, frozen=True):
    bins: int
    window_scores: int
    update_every_scores: int
    history_points: int
    history_slot_s: float = 300.0
    history_flush_s: float = 5.0


class AiRegistryConfig(_Strict, frozen=True):
    backend: str
    sqlite_path: str
    postgres_dsn: str
    poll_interval_s: float


class AiOpeConfig(_Strict, frozen=True):
    """Off-policy evaluation and the promotion gate (ai_plane/ope_log.py)."""

    # PromoteModel to live of a ranking model (offer_propensity) estimates the
    # candidate on the logged traffic and refuses (FAILED_PRECONDITION
    # OPE_CANDIDATE_BELOW_LOGGED) when its lower bound is below the logging
    # policy's value by more than margin, unless the request forces it.
    gate: bool = True
    # A share of the logging policy's value: refused when lower bound <
    # logged value x (1 - margin).
    margin: float = 0.1
    # Which estimate the gate reads: dr, snips or ips.
    estimator: str = "dr"
    confidence: float = 0.95
    # The logged window estimated when a request names none.
    window_s: int = 604800
    # Fewer counted rounds than this: not computed (OPE_TOO_FEW_ROUNDS).
    min_rounds: int = 200
    # When the estimate cannot be computed (no logged data, too few rounds,
    # no NATS, inputs missing from the log): allow (promote, the answer's
    # gate saying SKIPPED and why) or refuse (FAILED_PRECONDITION with the
    # reason).
    on_unavailable: str = "allow"
    # Most logged rewards read per estimate.
    max_rounds: int = 200000

    def __post_init__(self) -> None:
        if self.estimator not in ("dr", "snips", "ips"):
            raise ValueError("ai.ope.estimator must be dr, snips or ips")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError("ai.ope.confidence must be in (0, 1)")
        if self.on_unavailable not in ("allow", "refuse"):
            raise ValueError("ai.ope.on_unavailable must be allow or refuse")
        if self.margin < 0 or self.window_s <= 0 or self.min_rounds < 1 or self.max_rounds < 1:
            raise ValueError(
                "ai.ope.margin must be >= 0, window_s > 0, min_rounds and max_rounds >= 1"
            )


class AiConfig(_Strict, frozen=True):
    listen: str
    budget_ms: float
    metrics_listen: str
    triton_url: str
    triton: AiTritonConfig
    breaker: AiBreakerConfig
    fallback: AiFallbackConfig
    features: AiFeaturesConfig
    pipeline: AiPipelineConfig
    models: AiModelsConfig
    limits: AiLimitsConfig
    bandit: AiBanditConfig
    drift: AiDriftConfig
    registry: AiRegistryConfig
    ope: AiOpeConfig = msgspec.field(default_factory=AiOpeConfig)
    learner: AiLearnerConfig = msgspec.field(default_factory=AiLearnerConfig)
    # Inference transport: "grpc" (tritonclient's aio client, the default) or
    # "http" (KServe v2 binary tensors over Triton's HTTP endpoint).
    triton_protocol: str = "grpc"
    # The same Triton's HTTP endpoint (host:port), for triton_protocol "http".
    # Our own tritonserver serves both and sets this itself.
    triton_http_url: str = ""
    # With ai.triton_url: a model repository directory the external Triton
    # also reads (a volume both containers mount at this path, the Triton
    # sidecar started with --model-control-mode=explicit --load-model=*), so
    # a restarted Triton loads the live versions again by itself. Empty: the
    # model files travel inside each load request.
    triton_repository: str = ""
    # AI plane replicas serving together (the production overlay runs 3).
    replicas: int = 1


class GatewayBudgetsConfig(_Strict, frozen=True):
    # The gateway's own share of a caller's deadline (rule 7).
    own_budget_ms: float
    # Used when the caller sets no deadline.
    default_deadline_ms: float
    ai_score_budget_ms: float
    ai_rank_budget_ms: float
    ai_explain_budget_ms: float
    ai_outcome_budget_ms: float
    policy_budget_ms: float
    money_budget_ms: float
    nats_publish_budget_ms: float


class GatewayLimitsConfig(_Strict, frozen=True):
    max_id_length: int
    max_string_length: int
    max_attributes: int
    max_events_per_request: int
    max_alternatives: int
    max_features: int
    max_amount_minor: int


class GatewayIdempotencyConfig(_Strict, frozen=True):
    # Remembered answers of mutating RPCs and their outbox: sqlite (under
    # runtime.state_dir) or postgres, shared by every replica.
    sqlite_path: str
    memory_entries: int
    retention_s: int
    flush_interval_ms: float
    max_pending_writes: int
    # The keys below have defaults so a struct built in code (tests) may leave
    # them out; the shipped values are in defaults.yaml.
    backend: str = "sqlite"
    postgres_dsn: str = ""
    # On postgres: how long a replica's claim on a key (the flow running
    # under it) stands before another replica may take it over, and how often
    # a replica waiting for another's answer looks again.
    claim_lease_s: float = 60.0
    claim_poll_ms: float = 10.0
    # On postgres: how long a relay's claim on outbox rows stands.
    outbox_lease_s: float = 30.0


class GatewayPiiConfig(_Strict, frozen=True):
    # File holding the base64 tokenization key (HMAC-SHA256, 32+ bytes; a
    # Kubernetes Secret in a cluster), never the key itself; empty: a dev key
    # under state_dir/keys, created on first use. Keyed per tenant from it.
    tokenization_key_path: str
    token_prefix: str
    # ISO 3166 region whose national phone numbers are recognised inside free
    # text (numbers in international form are recognised whatever it says).
    phone_region: str


class OfferLeverConfig(_Strict, frozen=True):
    offer_id: str
    # Multiplies propensity x value for this offer (all surfaces).
    weight: float
    # Per-surface multipliers (surface name -> weight); absent: 1.0.
    surfaces: dict[str, float]


class SurfaceConfig(_Strict, frozen=True):
    name: str
    # Context weight of an offer shown on this surface.
    context_weight: float
    # Channel used when the policy plane names none (push, in_app, email, ...).
    default_channel: str


class GatewayArbitrationConfig(_Strict, frozen=True):
    # Value used for an offer without one (minor units), so it still competes.
    default_value_minor: int
    # Share of decisions that follow the bandit's exploration distribution
    # instead of the arbitration winner; the action's probability is logged.
    exploration_share: float
    levers: list[OfferLeverConfig]
    surfaces: list[SurfaceConfig]
    # Who decides which offer is shown: learner (the AI plane's learner: its
    # choice, with the probability it was drawn with; the levers go inside
    # its objective) or arbitration (the highest propensity x value x levers,
    # exploration_share of decisions following the bandit).
    policy: str = "learner"
    # Experiment arms (of gateway.decide_experiment) decided by another
    # policy than `policy`: arm name -> learner or arbitration.
    arm_policies: dict[str, str] = {}


class ExperimentArmConfig(_Strict, frozen=True):
    name: str
    # Relative share of the non-holdout population.
    weight: float


class ExperimentConfig(_Strict, frozen=True):
    name: str
    # Hash salt: changing it reshuffles customers into arms.
    salt: str
    arms: list[ExperimentArmConfig]


# ---- gateway engagement: delivery, triggers, measurement (gateway/delivery,
# gateway/triggers.py, gateway/measure.py) ----


class GatewayStoreConfig(_Strict, frozen=True):
    # Deliveries, trigger state, exposures and outcomes: sqlite or postgres.
    backend: str
    sqlite_path: str
    postgres_dsn: str


class ChannelEndpointConfig(_Strict, frozen=True):
    # The provider endpoint a channel adapter POSTs to (empty: channel off).
    url: str
    # File holding the Standard Webhooks signing secret ("whsec_" + base64):
    # a mounted Kubernetes Secret, never the secret itself in config.
    secret_path: str


class DeliveryConfig(_Strict, frozen=True):
    # Attempts and backoff of each delivery; then the dead-letter queue.
    retry: RetryPolicy
    request_timeout_s: float
    lease_s: float
    batch_size: int
    max_in_flight: int
    poll_interval_s: float
    max_payload_bytes: int
    max_pending: int
    default_page_size: int
    max_page_size: int
    circuit_failures: int
    circuit_open_s: float
    channels: dict[str, ChannelEndpointConfig]


class TriggerStepConfig(_Strict, frozen=True):
    event_type: str
    # Attributes the event must carry with exactly these values.
    match: dict[str, str]


class TriggerRuleConfig(_Strict, frozen=True):
    trigger_id: str
    steps: list[TriggerStepConfig]
    within_s: int
    delay_s: int
    send_within_s: int
    dedupe_window_s: int
    topic: str
    offer_id: str
    channels: list[str]
    template: str


class TriggersConfig(_Strict, frozen=True):
    max_events_per_customer: int
    event_retention_s: int
    max_attributes: int
    max_attribute_length: int
    runner_batch_size: int
    runner_poll_interval_s: float
    runner_lease_s: float
    max_reschedules: int
    rules: list[TriggerRuleConfig]


class MeasurementConfig(_Strict, frozen=True):
    attribution_window_s: int
    # How often the lift figures are recomputed for gateway.metrics_listen.
    metrics_interval_s: float
    confidence_level: float
    max_exposures_per_conversion: int
    max_batch_records: int
    max_report_rows: int
    min_group_customers: int


class PartnerWebhookConfig(_Strict, frozen=True):
    # Where a tenant's partner webhooks go, and the file holding their
    # Standard Webhooks secret (a mounted Kubernetes Secret).
    tenant_id: str
    url: str
    secret_path: str


class GatewayJwtConfig(_Strict, frozen=True):
    # OAuth2 client-credentials JWTs (gateway/auth/jwt.py). The identity
    # provider's JWKS: a file path or an https:// URL; empty: JWTs refused.
    jwks: str
    issuer: str
    audience: str
    algorithms: list[str]
    # Claim naming the tenant, and claim with the scopes (space-separated
    # string or list).
    tenant_claim: str
    scope_claim: str
    # Allowed clock difference with the identity provider (exp, nbf).
    leeway_s: int
    # The JWKS is read again this often, and on an unknown kid at most every
    # jwks_min_refresh_s.
    jwks_refresh_s: float
    jwks_min_refresh_s: float
    jwks_timeout_s: float
    max_token_bytes: int


class GatewayAuthConfig(_Strict, frozen=True):
    # Partner credentials on GatewayService (gateway/auth/). False: no
    # credential asked, the tenant is whatever a request names (local
    # debugging and the benchmark's baseline only; a WARNING at start).
    enabled: bool
    # "live" or "test": the prefix of the keys this gateway makes and accepts.
    environment: str
    # File holding the pepper of the keys' HMAC (32+ random bytes, base64): a
    # Kubernetes Secret, never the config map. Empty: the dev file
    # <state_dir>/keys/gateway-api-key-pepper, created on first use.
    pepper_file: str
    # File holding the bootstrap admin key (ApiKeyService for any tenant).
    # Empty: <state_dir>/keys/gateway-admin.key when it exists (the dev stack
    # makes it).
    admin_key_file: str
    # A verified key is trusted this long without reading its row again: the
    # bound on how long a revoked key still works on another replica.
    cache_ttl_s: float
    cache_max_entries: int
    rotation_overlap_s: int
    max_rotation_overlap_s: int
    max_keys_per_tenant: int
    default_page_size: int
    max_page_size: int
    jwt: GatewayJwtConfig


class RateClassConfig(_Strict, frozen=True):
    rate_per_s: float
    burst: float


class GatewayRateLimitConfig(_Strict, frozen=True):
    # A token bucket per credential (gateway/auth/ratelimit.py).
    enabled: bool
    rate_per_s: float
    burst: float
    # Per scope (the method's, e.g. events:write): its own bucket and limits.
    per_scope: dict[str, RateClassConfig]
    # Buckets kept in memory (least recently used dropped first).
    max_buckets: int
    # Set: the buckets live in Redis (GCRA), shared by every gateway replica.
    redis_url: str
    redis_key_prefix: str
    # A Redis that does not answer in this time: this replica's own bucket
    # decides (logged), so the limit holds per replica rather than not at all.
    redis_timeout_ms: float


class GatewayPlaneAddressesConfig(_Strict, frozen=True):
    # The gRPC target the gateway dials each plane at (host:port, or
    # dns:///host:port for every replica; the host is the name their
    # certificates must carry); empty: that plane's listen address, locally.
    money: str
    policy: str
    ai: str


class PayoutWebhooksConfig(_Strict, frozen=True):
    """Payout state changes (money.payout.<state> on the money stream) to the
    partner's webhook, review resolutions of payouts to the money plane, and
    reconciliation breaks to the partner's webhook (gateway/payout_events.py)."""

    # The durable JetStream consumer every gateway replica shares (each
    # event goes to one of them).
    durable_name: str = "gateway-payout-webhooks"
    # The durable consumers of review resolutions (policy.case.resolved: a
    # payout's approval or decline to the money plane) and of new
    # reconciliation breaks (money.recon.break to the partner's webhook).
    review_durable_name: str = "gateway-payout-reviews"
    break_durable_name: str = "gateway-break-webhooks"
    batch_size: int = 64
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 30.0
    max_deliver: int = 20


class GatewayConfig(_Strict, frozen=True):
    listen: str
    # A second port of the same API that requires client certificates, so the
    # admin identity is known there (the public port asks none); "": none.
    admin_listen: str
    # Server reflection on the public port (off in the production overlay).
    reflection: bool
    plane_addresses: GatewayPlaneAddressesConfig
    # IANA zone of a customer whose requests name none (their local hour).
    default_time_zone: str
    # Per tenant: the partner's webhook endpoint (triggered sends on the
    # partner_webhook channel). A tenant without one is not reached there.
    partner_webhooks: list[PartnerWebhookConfig]
    # host:port of the Prometheus metrics endpoint; empty: not served.
    metrics_listen: str
    budgets: GatewayBudgetsConfig
    limits: GatewayLimitsConfig
    idempotency: GatewayIdempotencyConfig
    # Exposure, outcome and bandit events, written with the answers they
    # belong to and relayed to JetStream (the same relay as the planes').
    outbox: OutboxConfig
    pii: GatewayPiiConfig
    auth: GatewayAuthConfig
    rate_limit: GatewayRateLimitConfig
    arbitration: GatewayArbitrationConfig
    # Global holdout: this share of customers (deterministic hash) never gets
    # an offer, so lift can be measured against it.
    holdout_share: float
    experiments: list[ExperimentConfig]
    # Experiment DecideNextAction assigns customers to (a name in experiments).
    decide_experiment: str
    store: GatewayStoreConfig
    delivery: DeliveryConfig
    triggers: TriggersConfig
    measurement: MeasurementConfig
    payout_webhooks: PayoutWebhooksConfig = msgspec.field(
        default_factory=lambda: PayoutWebhooksConfig()
    )


class StackPlaneConfig(_Strict, frozen=True):
    # The config section whose `listen` address the plane serves on.
    name: str
    # Started as `python -m <module>` when the package has a __main__.py.
    module: str
    # How the stack knows it is serving: grpc (the health service) or http
    # (200 on GET /healthz; such a plane runs one process, never replicas).
    health: str = "grpc"
    # Started only by `triplane up` or when named (the sandbox bank), so the
    # stacks tests and tools start keep to the planes.
    optional: bool = False


class StackConfig(_Strict, frozen=True):
    start_timeout_s: float
    stop_timeout_s: float
    health_poll_interval_s: float
    logs_dir: str
    planes: list[StackPlaneConfig]


class RailWorkerConfig(_Strict, frozen=True):
    """The money plane's rail worker (money_plane/rails/worker.py): hands
    approved payouts to their rails, sends ACH/SEPA files before each
    cut-off, records the bank's outcomes. Runs where sweepers run."""

    # How often approved payouts are handed to their rails.
    handoff_interval_s: float = 5.0
    # How often queued ACH / SEPA entries are checked against the next cut-off.
    flush_check_interval_s: float = 30.0
    # A file goes this long before its cut-off (and at any check after it).
    flush_lead_s: float = 600.0
    # How often each rail's new outcomes are read and recorded.
    deliver_interval_s: float = 15.0
    # Payouts handed off per pass; entries per file.
    batch: int = 200
    file_batch: int = 5000
    # How long a replica's claim on a unit (hand-off, a rail's delivery, a
    # file being sent) holds if it dies holding it.
    lease_s: float = 120.0


class RailsConfig(_Strict, frozen=True):
    """The money plane's rail adapters (money_plane/rails; README "Rails and
    the sandbox bank"): where each rail's bank endpoint is and who originates."""

    # Base URL of each rail's bank endpoint (HTTP); empty: bank_url.
    bank_url: str = "http://127.0.0.1:50090"
    instant_url: str = ""
    ach_url: str = ""
    sepa_url: str = ""
    card_url: str = ""
    # Longest wait for one call to the bank.
    timeout_s: float = 10.0
    # The originator (our account at the bank) named in every file.
    debtor_name: str = "TRIPLANE PAYOUTS"
    debtor_iban: str = "DE02120300000000202051"
    debtor_bic: str = "BYLADEM1001"
    debtor_routing_number: str = "021000021"
    debtor_account_number: str = "000123456789"
    ach_company_id: str = "1234567890"
    ach_company_name: str = "TRIPLANE"
    # Bank holidays (ISO dates) on top of weekends, for every rail's calendar.
    holidays: list[str] = []
    # A rail's failure of a payout before settlement with one of these
    # reasons (ISO 20022 status reasons, ACH return codes, or the adapter's
    # refusal at hand-off) sends the payout to its decision's next alternate
    # rail instead of failing it (money_plane/rails/worker.py); any other
    # reason, or no alternate left, fails it with the reversal.
    reroute_reasons: list[str] = msgspec.field(
        default_factory=lambda: [
            "AG01",  # transaction forbidden on this rail
            "AG03",  # transaction type not supported
            "AM02",  # over the rail's amount limit
            "TM01",  # after the rail's cut-off
            "AB05",  # timed out at the creditor agent
            "AB06",  # timed out at the instructed agent
            "MS03",  # reason not specified by the agent
            "RAIL_CANNOT_CARRY",  # refused at hand-off: unreachable, over limit
            "NO_RAIL_REACHES",
        ]
    )
    # Rails one payout is tried on at most (the first included).
    max_attempts: int = 3
    # The rail worker (off when bank_url is empty).
    worker: RailWorkerConfig = msgspec.field(default_factory=RailWorkerConfig)


class SandboxFaultsConfig(_Strict, frozen=True):
    # Share of payments with each outcome (drawn per payment from the seed and
    # its end-to-end id, so an outcome does not depend on arrival order).
    reject_rate: float = 0.02
    return_rate: float = 0.02
    duplicate_rate: float = 0.01
    late_rate: float = 0.01
    amount_change_rate: float = 0.01
    # Share of rejected payments booked anyway, after the reject.
    booked_after_reject_rate: float = 0.0
    # Share of ACH and SEPA files booked as one batch entry.
    batch_rate: float = 0.5


class SandboxBankConfig(_Strict, frozen=True):
    """The sandbox bank (triplane_sim/sandbox_bank; README "Rails and the
    sandbox bank"): a local HTTP bank the rail adapters talk to."""

    listen: str = "127.0.0.1:50090"
    seed: int = 14
    # system, or manual: a clock that moves only through POST /v1/clock
    # (tests, the demo), starting at manual_start.
    clock: str = "system"
    manual_start: str = "2026-12-07T14:00:00+00:00"
    faults: SandboxFaultsConfig = msgspec.field(default_factory=SandboxFaultsConfig)
    # Days after booking that a returned payment comes back.
    return_after_days: int = 2
    # Days a late booking is late by.
    late_by_days: int = 1
    # What a changed amount differs by (minor units; negative: less booked).
    amount_change_minor: int = -150
    # ISO reasons drawn for rejects and returns; ACH return codes likewise.
    reject_reasons: list[str] = msgspec.field(
        default_factory=lambda: ["AC01", "AC04", "AC06", "AG01", "RR04"]
    )
    return_reasons: list[str] = msgspec.field(
        default_factory=lambda: ["AC04", "AC06", "MD07", "BE04"]
    )
    ach_reject_codes: list[str] = msgspec.field(default_factory=lambda: ["R03", "R04"])
    ach_return_codes: list[str] = msgspec.field(default_factory=lambda: ["R01", "R02", "R16"])
    # The bank's own identity and the originator's accounts it keeps.
    bic: str = "SNDBUS33XXX"
    routing_number: str = "011000015"
    opening_balance_minor: int = 10_000_000_000
    # The largest file or message accepted.
    max_body_bytes: int = 16 * 1024 * 1024


class ConsoleStoreConfig(_Strict, frozen=True):
    # Accounts, sessions and the audit log: sqlite (one process) or postgres
    # (replicas share them).
    backend: str = "sqlite"
    # Relative paths are under runtime.state_dir.
    sqlite_path: str = "console/console.db"
    postgres_dsn: str = ""


class ConsoleOidcConfig(_Strict, frozen=True):
    # Sign-in through an identity provider (authorization code flow with
    # PKCE) when issuer is set; empty: local accounts (`triplane console
    # add-user`, argon2 hashes).
    issuer: str = ""
    client_id: str = ""
    # File holding the client secret (a mounted Secret); never the secret itself.
    client_secret_file: str = ""
    scopes: str = "openid profile email"
    # The ID token claim holding the user's groups, and which console roles
    # each group value gives (value -> roles). A user with none is refused.
    role_claim: str = "groups"
    role_map: dict[str, list[str]] = msgspec.field(default_factory=dict)
    # The claim naming the user in the audit log.
    username_claim: str = "preferred_username"


class ConsolePlaneAddressesConfig(_Strict, frozen=True):
    # gRPC targets, as gateway.plane_addresses; empty: the plane's own listen
    # address on this machine.
    money: str = ""
    policy: str = ""
    ai: str = ""
    # Empty: gateway.admin_listen on this machine (none when that is empty).
    gateway: str = ""


class ConsoleConfig(_Strict, frozen=True):
    """The operator console (console/; README "Console")."""

    listen: str = "127.0.0.1:50080"
    # The URL operators reach it at (OIDC redirect; cookies are Secure when
    # it is https). Empty: http://<listen>.
    public_url: str = ""
    # File holding the key that derives CSRF tokens and signs the OIDC state
    # (base64, 32 bytes). Empty: <state_dir>/keys/console-session.key, made once.
    session_key_file: str = ""
    # A session ends after this long without a request, and this long after
    # sign-in whatever happens.
    session_idle_s: float = 1800.0
    session_absolute_s: float = 43200.0
    # How often expired sessions are deleted (one is refused at once anyway).
    session_sweep_interval_s: float = 300.0
    # A username with this many refused sign-ins within the window is refused
    # (429) until the oldest leaves it; 0: no limit.
    login_max_failures: int = 5
    login_failure_window_s: float = 900.0
    store: ConsoleStoreConfig = msgspec.field(default_factory=ConsoleStoreConfig)
    oidc: ConsoleOidcConfig = msgspec.field(default_factory=ConsoleOidcConfig)
    plane_addresses: ConsolePlaneAddressesConfig = msgspec.field(
        default_factory=ConsolePlaneAddressesConfig
    )
    # Deadline of each call the console makes to a plane.
    plane_timeout_s: float = 5.0
    # Rows a list page asks a plane for.
    page_size: int = 50
    # host:port of the Prometheus metrics endpoint. Empty: not served.
    metrics_listen: str = ""


class Config(_Strict, frozen=True):
    runtime: RuntimeConfig
    nats: NatsConfig
    keys: KeysConfig
    money: MoneyConfig
    gateway: GatewayConfig
    policy: PolicyConfig
    ai: AiConfig
    stack: StackConfig
    rails: RailsConfig = msgspec.field(default_factory=RailsConfig)
    sandbox_bank: SandboxBankConfig = msgspec.field(default_factory=SandboxBankConfig)
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)

    @property
    def state_path(self) -> Path:
        return Path(self.runtime.state_dir)


def _defaults() -> dict[str, Any]:
    text = resources.files("triplane.runtime").joinpath("defaults.yaml").read_text()
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def _merge(base: dict[str, Any], override: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{where}'")
        if isinstance(base[key], dict) and isinstance(value, bool) and "enabled" in base[key]:
            # A section that can be switched off may be given as on/off
            # (`runtime.tls: off`), short for its `enabled` key.
            value = {"enabled": value}
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{where}' must be a mapping")
            # A mapping that is empty in the defaults is free-form (a map such
            # as per-offer levers): its keys are the user's; the typed Struct
            # still checks its values.
            merged[key] = dict(value) if not base[key] else _merge(base[key], value, f"{where}.")
        else:
            merged[key] = value
    return merged


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    if environ.get("NATS_URL"):
        tree.setdefault("nats", {})["url"] = environ["NATS_URL"]
    if environ.get("TRIPLANE_STATE_DIR"):
        tree.setdefault("runtime", {})["state_dir"] = environ["TRIPLANE_STATE_DIR"]
    if environ.get("TRIPLANE_MONEY_DSN"):
        store = tree.setdefault("money", {}).setdefault("store", {})
        store["postgres_dsn"] = environ["TRIPLANE_MONEY_DSN"]
        store.setdefault("backend", "postgres")
    if environ.get("TRITON_URL"):
        tree.setdefault("ai", {})["triton_url"] = environ["TRITON_URL"]
    if environ.get("TRIPLANE_AI_DSN"):
        registry = tree.setdefault("ai", {}).setdefault("registry", {})
        registry["postgres_dsn"] = environ["TRIPLANE_AI_DSN"]
        registry.setdefault("backend", "postgres")
    if environ.get("TRIPLANE_POLICY_DSN"):
        policy_store = tree.setdefault("policy", {}).setdefault("store", {})
        policy_store["postgres_dsn"] = environ["TRIPLANE_POLICY_DSN"]
        policy_store.setdefault("backend", "postgres")
    if environ.get("TRIPLANE_CONSOLE_DSN"):
        console_store = tree.setdefault("console", {}).setdefault("store", {})
        console_store["postgres_dsn"] = environ["TRIPLANE_CONSOLE_DSN"]
        console_store.setdefault("backend", "postgres")
    if environ.get("TRIPLANE_GATEWAY_DSN"):
        # Both gateway databases on one PostgreSQL database (their tables
        # are disjoint): the engagement store and the remembered answers.
        gateway = tree.setdefault("gateway", {})
        for section in ("store", "idempotency"):
            gateway_store = gateway.setdefault(section, {})
            gateway_store["postgres_dsn"] = environ["TRIPLANE_GATEWAY_DSN"]
            gateway_store.setdefault("backend", "postgres")
    return tree


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Loads the config: defaults, then `path` (or $TRIPLANE_CONFIG), then env,
    then `overrides` (a nested mapping, for tests and embedding)."""
    env = os.environ if environ is None else environ
    data = _defaults()
    file_path = path if path is not None else env.get("TRIPLANE_CONFIG")
    if file_path:
        loaded = yaml.safe_load(Path(file_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file_path}: top level must be a mapping")
        data = _merge(data, loaded)
    data = _merge(data, _env_overrides(env))
    if overrides:
        data = _merge(data, overrides)
    _money_shard_dsns(data, env)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
    _check(config)
    return config


def _check_streams(config: Config) -> None:
    """Every stream of the spine is bounded in size, age and event size."""
    for name in NatsStreamsConfig.__struct_fields__:
        limits: StreamLimitsConfig = getattr(config.nats.streams, name)
        key = f"nats.streams.{name}"
        if limits.max_bytes <= 0 or limits.max_msg_bytes <= 0:
            raise ConfigError(f"{key}: max_bytes and max_msg_bytes must be > 0")
        if limits.max_age_s < 0:
            raise ConfigError(f"{key}.max_age_s must be >= 0 (0: bounded by max_bytes alone)")
        if limits.max_msgs_per_subject == 0 or limits.max_msgs_per_subject < -1:
            raise ConfigError(f"{key}.max_msgs_per_subject must be > 0, or -1 for no bound")
    directory = config.nats.tenant_directory
    if directory.known_entries < 1 or directory.unknown_entries < 1:
        raise ConfigError("nats.tenant_directory: known_entries and unknown_entries must be >= 1")
    if directory.unknown_ttl_s < 0:
        raise ConfigError("nats.tenant_directory.unknown_ttl_s must be >= 0")


def _check_retries(config: Config) -> None:
    """Which retry policies may run until cancelled: the relays must (they
    never give up while their plane runs); work a caller waits for, or that
    must end in the dead-letter queue, must not."""
    forever = {
        "money.outbox.relay_retry": config.money.outbox.relay_retry,
        "gateway.outbox.relay_retry": config.gateway.outbox.relay_retry,
        "policy.outbox.relay_retry": config.policy.outbox.relay_retry,
    }
    for key, policy in forever.items():
        if not policy.until_cancelled:
            raise ConfigError(f"{key}.maximum_attempts must be 0: a relay retries until cancelled")
    bounded = {
        "money.store.conflict_retry": config.money.store.conflict_retry,
        "policy.decision_log.write_retry": config.policy.decision_log.write_retry,
        # Bounded so a delivery that cannot succeed reaches the dead-letter queue.
        "gateway.delivery.retry": config.gateway.delivery.retry,
    }
    for key, policy in bounded.items():
        if policy.until_cancelled:
            raise ConfigError(
                f"{key}.maximum_attempts must be >= 1 (0, until cancelled, is for relays only)"
            )


def pending_store(ai: AiConfig) -> str:
    """Where Rank's pending rankings live: ai.bandit.pending_store, auto
    resolved (redis with the Redis feature store, else in_process)."""
    if ai.bandit.pending_store != "auto":
        return ai.bandit.pending_store
    return "redis" if ai.features.backend == "redis" else "in_process"


def _check_ai_learner(ai: AiConfig) -> None:
    learner = ai.learner
    if learner.engine not in ("thompson", "vw"):
        raise ConfigError("ai.learner.engine must be 'thompson' or 'vw'")
    if learner.exploration not in ("squarecb", "epsilon"):
        raise ConfigError("ai.learner.exploration must be 'squarecb' or 'epsilon'")
    if not 0.0 < learner.epsilon <= 1.0 or learner.gamma_scale <= 0:
        raise ConfigError("ai.learner.epsilon must be in (0, 1] and gamma_scale > 0")
    if not 10 <= learner.bits <= 28:
        raise ConfigError("ai.learner.bits must be in [10, 28]")
    if learner.objective not in ("value", "conversion"):
        raise ConfigError("ai.learner.objective must be 'value' or 'conversion'")
    if learner.value_scale_minor <= 0 or learner.max_reward <= 0:
        raise ConfigError("ai.learner.value_scale_minor and max_reward must be > 0")
    if learner.max_live_models < 1 or learner.max_rewarded_ranks < 1:
        raise ConfigError("ai.learner.max_live_models and max_rewarded_ranks must be >= 1")
    if not 0 < learner.reward_window_s < ai.bandit.pending_ttl_s:
        raise ConfigError(
            "ai.learner.reward_window_s must be > 0 and below ai.bandit.pending_ttl_s "
            "(the ranking must outlive its window for the window's 0 to be learned)"
        )
    if learner.sweep_interval_s <= 0:
        raise ConfigError("ai.learner.sweep_interval_s must be > 0")


def _check_ai_replicas(config: Config) -> None:
    """The registry's backend, and what more than one AI plane replica needs:
    one feature store they all read (the in-process one would split the
    features between them) and one registry (a file is one pod's own)."""
    ai = config.ai
    if ai.registry.backend not in ("file", "sqlite", "postgres"):
        raise ConfigError("ai.registry.backend must be 'file', 'sqlite' or 'postgres'")
    if ai.registry.backend == "postgres" and not ai.registry.postgres_dsn:
        raise ConfigError("ai.registry.postgres_dsn is required with backend 'postgres'")
    if ai.registry.poll_interval_s <= 0:
        raise ConfigError("ai.registry.poll_interval_s must be > 0")
    if ai.replicas < 1:
        raise ConfigError("ai.replicas must be >= 1")
    if ai.replicas > 1 and ai.features.backend == "in_process":
        raise ConfigError(
            f"ai.features.backend 'in_process' with ai.replicas {ai.replicas}: each replica "
            "would keep its own features and score on a part of them; set "
            "ai.features.backend to 'redis' (or 'aerospike') for more than one replica"
        )
    if ai.bandit.pending_store not in ("auto", "in_process", "redis"):
        raise ConfigError("ai.bandit.pending_store must be auto, in_process or redis")
    if ai.bandit.outcomes not in ("spine", "local"):
        raise ConfigError("ai.bandit.outcomes must be 'spine' or 'local'")
    if ai.replicas > 1 and pending_store(ai) != "redis":
        raise ConfigError(
            f"ai.bandit.pending_store {ai.bandit.pending_store!r} with ai.replicas {ai.replicas}: "
            "an outcome reported to another replica would not find its ranking; set "
            "ai.bandit.pending_store to 'redis' (or ai.features.backend to 'redis')"
        )
    _check_ai_learner(ai)
    if ai.replicas > 1 and ai.bandit.outcomes != "spine":
        raise ConfigError(
            f"ai.bandit.outcomes 'local' with ai.replicas {ai.replicas}: each replica's "
            "bandit would learn only the outcomes reported to it; set it to 'spine'"
        )
    if ai.replicas > 1 and ai.registry.backend != "postgres":
        raise ConfigError(
            f"ai.registry.backend {ai.registry.backend!r} with ai.replicas {ai.replicas}: "
            "the replicas must share one registry; set ai.registry.backend to 'postgres' "
            "(or TRIPLANE_AI_DSN)"
        )


def money_shard_dsn_env(name: str) -> str:
    """The environment variable that gives shard `name` its DSN."""
    return "TRIPLANE_MONEY_DSN_" + "".join(c if c.isalnum() else "_" for c in name).upper()


def _money_shard_dsns(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Fills each money shard's empty postgres_dsn from its environment
    variable, else from its postgres_dsn_file."""
    store = data.get("money", {}).get("store", {})
    if not isinstance(store.get("shards"), list):
        return
    # Copies: the lists and mappings may be the caller's (overrides).
    shards = [dict(s) if isinstance(s, Mapping) else s for s in store["shards"]]
    store["shards"] = shards
    for shard in shards:
        if not isinstance(shard, dict) or shard.get("postgres_dsn"):
            continue
        from_env = env.get(money_shard_dsn_env(str(shard.get("name", ""))))
        if from_env:
            shard["postgres_dsn"] = from_env
        elif shard.get("postgres_dsn_file"):
            try:
                shard["postgres_dsn"] = Path(shard["postgres_dsn_file"]).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"money.store.shards[{shard.get('name')}].postgres_dsn_file: {exc}"
                ) from exc


def _check_money_shards(config: Config) -> None:
    store = config.money.store
    if not store.shards:
        return
    if store.backend != "postgres":
        raise ConfigError("money.store.shards needs money.store.backend: postgres")
    names = [shard.name for shard in store.shards]
    if len(set(names)) != len(names):
        raise ConfigError("money.store.shards: shard names must be unique")
    for shard in store.shards:
        if not shard.name or not all(c.isalnum() or c == "_" for c in shard.name):
            raise ConfigError("money.store.shards: a name is letters, digits and _")
        if not shard.postgres_dsn:
            raise ConfigError(
                f"money.store.shards[{shard.name}]: no DSN (set {money_shard_dsn_env(shard.name)}"
                " or postgres_dsn_file)"
            )


def _check(config: Config) -> None:
    _check_retries(config)
    _check_money_shards(config)
    _check_streams(config)
    if config.ai.features.backend not in ("in_process", "redis", "aerospike"):
        raise ConfigError("ai.features.backend must be 'in_process', 'redis' or 'aerospike'")
    if config.ai.features.backend == "aerospike" and not config.ai.features.aerospike_hosts:
        raise ConfigError("ai.features.aerospike_hosts is required with backend 'aerospike'")
    _check_ai_replicas(config)
    if config.ai.triton_protocol not in ("grpc", "http"):
        raise ConfigError("ai.triton_protocol must be 'grpc' or 'http'")
    if (
        config.ai.triton_protocol == "http"
        and config.ai.triton_url
        and not (config.ai.triton_http_url)
    ):
        raise ConfigError("ai.triton_http_url is required with an external Triton over 'http'")
    breaker = config.ai.breaker
    if breaker.failure_threshold < 1 or breaker.open_s <= 0 or breaker.window_s <= 0:
        raise ConfigError("ai.breaker: failure_threshold >= 1, open_s > 0 and window_s > 0")
    if not 0 < breaker.failure_rate <= 1:
        raise ConfigError("ai.breaker.failure_rate must be in (0, 1]")
    if config.money.store.backend not in ("sqlite", "postgres"):
        raise ConfigError("money.store.backend must be 'sqlite' or 'postgres'")
    store = config.money.store
    if store.backend == "postgres" and not store.postgres_dsn and not store.shards:
        raise ConfigError("money.store.postgres_dsn is required with backend 'postgres'")
    if config.money.group_commit.workers < 1:
        raise ConfigError("money.group_commit.workers must be >= 1")
    if config.runtime.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError("runtime.event_loop must be 'uvloop' or 'asyncio'")
    if config.runtime.log_format not in ("json", "text"):
        raise ConfigError("runtime.log_format must be 'json' or 'text'")
    if config.policy.store.backend not in ("sqlite", "postgres"):
        raise ConfigError("policy.store.backend must be 'sqlite' or 'postgres'")
    if config.policy.store.backend == "postgres" and not config.policy.store.postgres_dsn:
        raise ConfigError("policy.store.postgres_dsn is required with backend 'postgres'")
    for section, outbox in (("money", config.money.outbox), ("gateway", config.gateway.outbox)):
        if outbox.relay_idle_poll_ms <= 0:
            raise ConfigError(f"{section}.outbox.relay_idle_poll_ms must be > 0")
        if outbox.relay_idle_max_ms < 0:
            raise ConfigError(f"{section}.outbox.relay_idle_max_ms must be >= 0 (0: no backoff)")
    if config.policy.bundles.follow_interval_s < 0:
        raise ConfigError("policy.bundles.follow_interval_s must be >= 0 (0: never)")
    _check_gateway_stores(config)
    _check_tls(config)
    _check_grpc(config)
    _check_gateway_auth(config)
    _check_gateway_policy(config)
    _check_console(config)


def _check_console(config: Config) -> None:
    console = config.console
    if console.store.backend not in ("sqlite", "postgres"):
        raise ConfigError("console.store.backend must be 'sqlite' or 'postgres'")
    if console.store.backend == "postgres" and not console.store.postgres_dsn:
        raise ConfigError("console.store.postgres_dsn is required with backend 'postgres'")
    if not 0 < console.session_idle_s <= console.session_absolute_s:
        raise ConfigError("console: 0 < session_idle_s <= session_absolute_s")
    if console.session_sweep_interval_s <= 0:
        raise ConfigError("console.session_sweep_interval_s must be > 0")
    if console.login_max_failures < 0 or console.login_failure_window_s <= 0:
        raise ConfigError("console: login_max_failures >= 0 and login_failure_window_s > 0")
    if console.plane_timeout_s <= 0 or console.page_size < 1:
        raise ConfigError("console: plane_timeout_s > 0 and page_size >= 1")
    oidc = console.oidc
    if oidc.issuer and not (oidc.client_id and oidc.client_secret_file and oidc.role_map):
        raise ConfigError("console.oidc: issuer needs client_id, client_secret_file and role_map")


def _check_gateway_stores(config: Config) -> None:
    # The backends and their DSNs are checked where the databases are opened
    # (gateway/storage.py: InvalidArgument naming the key), as gateway.store's.
    idempotency = config.gateway.idempotency
    if idempotency.claim_lease_s <= 0 or idempotency.claim_poll_ms <= 0:
        raise ConfigError("gateway.idempotency: claim_lease_s > 0 and claim_poll_ms > 0")
    if idempotency.outbox_lease_s <= 0:
        raise ConfigError("gateway.idempotency.outbox_lease_s must be > 0")


def _check_tls(config: Config) -> None:
    tls = config.runtime.tls
    if tls.reload_check_interval_s <= 0 or tls.rotation_close_grace_s < 0:
        raise ConfigError(
            "runtime.tls: reload_check_interval_s > 0 and rotation_close_grace_s >= 0"
        )
    if tls.peer_cache_entries < 1 or tls.dev_cert_days < 1:
        raise ConfigError("runtime.tls: peer_cache_entries >= 1 and dev_cert_days >= 1")
    for role, identities in tls.roles.items():
        for identity in identities:
            if not identity.startswith("spiffe://"):
                raise ConfigError(
                    f"runtime.tls.roles.{role}: {identity!r} is not a SPIFFE ID (spiffe://...)"
                )
    if bool(tls.cert_path) != bool(tls.key_path):
        raise ConfigError("runtime.tls: cert_path and key_path are set together")
    nats = config.nats
    if bool(nats.tls_cert_path) != bool(nats.tls_key_path):
        raise ConfigError("nats: tls_cert_path and tls_key_path are set together")
    if nats.password_file and not nats.user:
        raise ConfigError("nats.password_file needs nats.user")
    if nats.creds_file and nats.user:
        raise ConfigError("nats: creds_file and user/password_file are exclusive")


def _check_grpc(config: Config) -> None:
    grpc_config = config.runtime.grpc
    if grpc_config.load_balancing not in ("round_robin", "pick_first"):
        raise ConfigError("runtime.grpc.load_balancing must be 'round_robin' or 'pick_first'")
    if not 1 <= grpc_config.retry.maximum_attempts <= 5:
        raise ConfigError("runtime.grpc.retry.maximum_attempts must be in [1, 5] (gRPC's cap)")
    if grpc_config.retry.initial_interval_s <= 0:
        raise ConfigError("runtime.grpc.retry.initial_interval_s must be > 0")
    if grpc_config.max_connection_age_s < 0:
        raise ConfigError("runtime.grpc.max_connection_age_s must be >= 0 (0: no limit)")
    if grpc_config.max_connection_age_grace_s < 0:
        raise ConfigError("runtime.grpc.max_connection_age_grace_s must be >= 0")


def _check_gateway_policy(config: Config) -> None:
    arbitration = config.gateway.arbitration
    for where, policy in [("policy", arbitration.policy), *arbitration.arm_policies.items()]:
        if policy not in ("learner", "arbitration"):
            raise ConfigError(
                f"gateway.arbitration.{'arm_policies.' if where != 'policy' else ''}{where} "
                f"must be 'learner' or 'arbitration', not {policy!r}"
            )


def _check_gateway_auth(config: Config) -> None:
    auth, limit = config.gateway.auth, config.gateway.rate_limit
    if auth.environment not in ("live", "test"):
        raise ConfigError("gateway.auth.environment must be 'live' or 'test'")
    if auth.cache_ttl_s < 0 or auth.cache_max_entries < 1 or auth.max_keys_per_tenant < 1:
        raise ConfigError(
            "gateway.auth: cache_ttl_s >= 0, cache_max_entries >= 1, max_keys_per_tenant >= 1"
        )
    if not 0 <= auth.rotation_overlap_s <= auth.max_rotation_overlap_s:
        raise ConfigError("gateway.auth: 0 <= rotation_overlap_s <= max_rotation_overlap_s")
    if not 1 <= auth.default_page_size <= auth.max_page_size:
        raise ConfigError("gateway.auth: 1 <= default_page_size <= max_page_size")
    jwt = auth.jwt
    if jwt.jwks and not (jwt.issuer and jwt.audience):
        raise ConfigError("gateway.auth.jwt: issuer and audience are required with a jwks")
    if not set(jwt.algorithms) <= {"EdDSA", "Ed25519", "ES256"} or not jwt.algorithms:
        raise ConfigError("gateway.auth.jwt.algorithms: EdDSA, Ed25519 or ES256 (asymmetric)")
    classes = [("", limit.rate_per_s, limit.burst)] + [
        (f".per_scope.{name}", c.rate_per_s, c.burst) for name, c in limit.per_scope.items()
    ]
    for where, rate_per_s, burst in classes:
        if rate_per_s <= 0 or burst < 1:
            raise ConfigError(f"gateway.rate_limit{where}: rate_per_s > 0 and burst >= 1")
    if limit.max_buckets < 1 or limit.redis_timeout_ms <= 0:
        raise ConfigError("gateway.rate_limit: max_buckets >= 1 and redis_timeout_ms > 0")


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of `config` with some keys changed (nested mapping)."""
    data = msgspec.to_builtins(config)
    merged = _merge(data, overrides)
    result = msgspec.convert(merged, Config)
    _check(result)
    return result
