"""The money plane's Prometheus metrics (served with RED per RPC on
money.metrics_listen, triplane/runtime/metrics.py). Defined once per process:
two ledgers in one process (tests) add to the same series."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Powers of two up to past money.group_commit.max_batch_transfers' default (512).
GROUP_COMMIT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

GROUP_COMMIT_TRANSFERS = Histogram(
    "triplane_money_group_commit_transfers",
    "Transfers committed together in one database transaction (a group commit)",
    buckets=GROUP_COMMIT_BUCKETS,
)
TRANSFERS = Counter(
    "triplane_money_transfers",
    "Transfers through the group commit, by kind and result: committed, refused "
    "(a business refusal, e.g. insufficient funds) or replayed (an idempotent retry)",
    ["kind", "result"],
)
COMMIT_QUEUE_TRANSFERS = Gauge(
    "triplane_money_commit_queue_transfers",
    "Transfers queued for or in a group commit (bound: money.group_commit.max_queue_transfers)",
    # Each serving process queues its own (money.server_processes).
    multiprocess_mode="livesum",
)
OUTBOX_LAG_SECONDS = Gauge(
    "triplane_money_outbox_lag_seconds",
    "Age of the oldest unpublished ledger event when the outbox relay last read the "
    "outbox (0: none was waiting)",
    # Only the primary process relays (money.server_processes).
    multiprocess_mode="max",
)
OUTBOX_PUBLISHED = Counter(
    "triplane_money_outbox_published_events",
    "Ledger events JetStream acknowledged and the outbox marked sent",
)
RESERVE_RELEASES = Counter(
    "triplane_money_reserve_releases",
    "Rolling-reserve releases the sweeper posted (released) or could not post and put "
    "off by money.reserves.refused_retry_s (deferred)",
    ["result"],
)
# Seconds from a bank document's arrival in the statement intake to its
# breaks' events (money_plane/recon/intake.py): how long a fault goes unseen
# once the bank has told.
RECON_DETECTION_SECONDS = Histogram(
    "triplane_money_recon_detection_seconds",
    "Time from a bank statement document's arrival in the statement intake to the "
    "events of the breaks it raised",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
STATEMENT_DOCUMENTS = Counter(
    "triplane_money_statement_documents",
    "Bank statement documents the statement intake read: imported, or refused "
    "(unreadable, or naming an account the tenant lacks: skipped)",
    ["result"],
)
STATEMENT_LINES_UNATTRIBUTED = Counter(
    "triplane_money_statement_lines_unattributed",
    "Bank statement lines the statement intake left out: no payout of this ledger "
    "(or payouts of several tenants in one batch booking) named by them",
)
