"""Prometheus metrics, in a registry per app so that several apps can live in one process.

Labels carry route templates, action names and outcome words only: never a
path with ids in it, a customer, or anything secret.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double every counter's series for little use here.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the sidecar exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "metering_http_requests",
            "Requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "metering_http_request_duration_seconds",
            "Time to answer a request, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "metering_upstream_requests",
            "Attempts sent to AWS, by action and outcome "
            "(success, throttled, server_error, client_error, credentials_rejected, "
            "timeout, connection_error).",
            ["action", "outcome"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "metering_upstream_request_duration_seconds",
            "Time of one attempt to AWS, by action.",
            ["action"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter(
            "metering_upstream_retries",
            "Attempts repeated after a retryable failure, by action and reason.",
            ["action", "reason"],
            registry=r,
        )
        self.aws_problem = Gauge(
            "metering_aws_problem",
            "1 while AWS keeps refusing or failing our calls for this cause (credentials, "
            "configuration, throttling, transient, unknown); queued usage waits meanwhile.",
            ["cause"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "metering_quota_refusals",
            "Calls answered 429 by the sidecar because AWS's request quota for the action "
            "had no slot before the call's deadline, by action.",
            ["action"],
            registry=r,
        )
        # The account's quota shared by the fleet, and this replica's own slow-down
        # after throttling (app.aws.quota).
        self.quota_shared_unreachable = Gauge(
            "metering_quota_shared_unreachable",
            "1 while the fleet's request quota in the shared store cannot be reached: this "
            "replica keeps to the account's quota divided by the fallback divisor meanwhile.",
            registry=r,
        )
        self.quota_slot_seconds = Histogram(
            "metering_quota_shared_slot_seconds",
            "Time to take one slot of the fleet's request quota in the shared store (one "
            "statement), before the send it is for.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.quota_adaptive_rate = Gauge(
            "metering_quota_adaptive_rate",
            "Requests per second this replica sends at most, by action: the configured quota, "
            "or less for a while after AWS throttled it (0: no limit).",
            ["action"],
            registry=r,
        )
        self.clock_skew = Gauge(
            "metering_clock_skew_seconds",
            "This replica's clock minus the shared store's (the fleet's clock for hours, "
            "deadlines and leases), as last measured; 0 with SQLite.",
            registry=r,
        )
        self.unprocessed_records = Counter(
            "metering_unprocessed_records",
            "Records AWS returned in UnprocessedRecords (each then resent).",
            registry=r,
        )
        self.credential_refreshes = Counter(
            "metering_credential_refreshes",
            "Credential resolutions, by trigger (initial, scheduled, forced) and result.",
            ["trigger", "result"],
            registry=r,
        )
        self.credential_expiry = Gauge(
            "metering_credential_expiry_seconds",
            "Seconds until the current credentials expire (+Inf: no expiry; -1: none held).",
            registry=r,
        )
        self.queue_records = Counter(
            "metering_queue_records",
            "Records offered to the usage queue, by status (queued, replayed, "
            "rolled_forward, refused, spooled: taken into the local spool of a shared store).",
            ["status"],
            registry=r,
        )
        self.queue_outcomes = Counter(
            "metering_queue_outcomes",
            "What became of grain attempts, by outcome (accepted, rejected, "
            "duplicate_record, expired, retry) and reason (AWS's status or code).",
            ["outcome", "reason"],
            registry=r,
        )
        # The queue's figures carry scope="replica" (this sidecar's own SQLite queue)
        # or scope="fleet" (a shared store: every replica reports the same figure,
        # so take max or min across pods, never the sum).
        self.queue_pending_records = Gauge(
            "metering_queue_pending_records",
            "Records whose grain has not been settled yet.",
            ["scope"],
            registry=r,
        )
        self.queue_grains_due = Gauge(
            "metering_queue_grains_due",
            "Grains whose hour has closed and that are not settled yet.",
            ["scope"],
            registry=r,
        )
        self.queue_oldest_pending_age = Gauge(
            "metering_queue_oldest_pending_age_seconds",
            "Age of the oldest record not yet settled (0: none).",
            ["scope"],
            registry=r,
        )
        self.queue_nearest_deadline = Gauge(
            "metering_queue_nearest_deadline_seconds",
            "Seconds until the nearest submission deadline of an unsent grain (-1: none).",
            ["scope"],
            registry=r,
        )
        self.queue_commits = Gauge(
            "metering_queue_commits",
            "Durable commits of the usage store since start (one fsync each).",
            registry=r,
        )
        # The shared store's local spool (app.queue.spool): per replica, each its own.
        self.queue_store_problem = Gauge(
            "metering_queue_store_problem",
            "1 while the shared PostgreSQL store cannot be used (its last call failed: down, "
            "failing over, unreachable, past the store deadline); new usage goes to the "
            "local spool meanwhile, and the reason is on /readyz.",
            registry=r,
        )
        self.spooled = Counter(
            "metering_spooled_records",
            "Records written to the local spool instead of the shared store, by cause "
            "(store_unavailable: the store was known to be down; store_failed: the call "
            "failed or passed the store deadline, its outcome settled by id later; "
            "keys_waiting: one of its IdempotencyKeys waited in the spool).",
            ["cause"],
            registry=r,
        )
        self.spool_settled = Counter(
            "metering_spool_settled_records",
            "Spooled records settled when moved into the shared store, by outcome (moved; "
            "already_stored: the store had the id, a call whose commit's answer was lost; "
            "replayed: its IdempotencyKey was seen with the same content; rejected: refused, "
            "with the reason on the record, never billed).",
            ["outcome"],
            registry=r,
        )
        self.spool_waiting = Gauge(
            "metering_spool_waiting_records",
            "Records in this replica's local spool waiting to move into the shared store.",
            registry=r,
        )
        self.spool_oldest_age = Gauge(
            "metering_spool_oldest_age_seconds",
            "Age of the oldest record waiting in the local spool (0: none).",
            registry=r,
        )
        self.events = Counter(
            "metering_events",
            "AWS Marketplace subscription events taken in (from the SQS queue or "
            "POST /v1/events), by AWS's type and outcome (applied, duplicate, recorded: a "
            "type that changes nothing, unreadable: left to the queue's redrive policy, "
            "failed: not applied, to be delivered again).",
            ["type", "outcome"],
            registry=r,
        )
        self.events_queue_problem = Gauge(
            "metering_events_queue_problem",
            "1 while the events queue cannot be read (the reason is on /readyz).",
            registry=r,
        )
        self.customers = Gauge(
            "metering_customers",
            "Customers the registry knows, by status (active, ending, ended).",
            ["status"],
            registry=r,
        )
        self.usage_refusals = Counter(
            "metering_usage_refusals",
            "Usage records refused for their customer, by reason "
            "(CustomerSubscriptionEnded, CustomerFormConflict).",
            ["reason"],
            registry=r,
        )
        self.background_stopped = Gauge(
            "metering_background_loops_stopped",
            "Background loops (the queue's dispatcher, the spool's mover, the credential "
            "refresh, the events poller) that stopped by a fault while the sidecar runs; "
            "the sidecar is degraded until restarted.",
            registry=r,
        )
        self.sandbox = Gauge(
            "metering_sandbox_mode",
            "1 when the sidecar answers locally and sends nothing to AWS.",
            registry=r,
        )

    def watch_credential_expiry(self, seconds_left: Callable[[], float]) -> None:
        """Compute the expiry gauge at scrape time, so it is never stale."""
        self.credential_expiry.set_function(seconds_left)
