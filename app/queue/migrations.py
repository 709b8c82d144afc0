"""The queue's schema, as ordered lists of migrations, one list per engine. Never edit
one that shipped: add the next version."""

from __future__ import annotations

# SQLite (app.queue.sqlite).
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            # Key columns hold '' rather than NULL so that UNIQUE sees one grain.
            """CREATE TABLE grains (
                id INTEGER PRIMARY KEY,
                kind TEXT NOT NULL CHECK (kind IN ('batch', 'meter')),
                product_code TEXT NOT NULL,
                license_arn TEXT NOT NULL,
                customer_identifier TEXT NOT NULL,
                customer_aws_account_id TEXT NOT NULL,
                dimension TEXT NOT NULL,
                hour INTEGER NOT NULL,
                status TEXT NOT NULL
                    CHECK (status IN ('open', 'frozen', 'accepted', 'rejected', 'expired')),
                content TEXT NOT NULL,
                due_at REAL NOT NULL,
                deadline REAL NOT NULL,
                payload TEXT,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at REAL,
                last_error TEXT,
                metering_record_id TEXT,
                reason TEXT,
                created_at REAL NOT NULL,
                frozen_at REAL,
                finished_at REAL,
                UNIQUE (kind, product_code, license_arn, customer_identifier,
                        customer_aws_account_id, dimension, hour)
            )""",
            "CREATE INDEX grains_status_due ON grains (status, due_at)",
            "CREATE INDEX grains_status_next ON grains (status, next_attempt_at)",
            "CREATE INDEX grains_status_deadline ON grains (status, deadline)",
            "CREATE INDEX grains_finished ON grains (finished_at)",
            """CREATE TABLE usage_records (
                id TEXT PRIMARY KEY,
                idempotency_key TEXT UNIQUE,
                content_hash TEXT NOT NULL,
                grain_id INTEGER NOT NULL REFERENCES grains (id) ON DELETE CASCADE,
                original_hour INTEGER NOT NULL,
                rolled_forward INTEGER NOT NULL,
                record TEXT NOT NULL,
                customer TEXT NOT NULL,
                received_at REAL NOT NULL
            )""",
            "CREATE INDEX usage_records_grain ON usage_records (grain_id)",
            "CREATE INDEX usage_records_customer ON usage_records (customer, id)",
            "CREATE INDEX usage_records_hour ON usage_records (original_hour, id)",
            # Written by readiness checks: a write that must reach the disk.
            "CREATE TABLE store_heartbeat "
            "(id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL)",
        ],
    ),
    (
        2,
        [
            # IdempotencyKeys outlive their records: a replay after the record
            # was pruned still finds its id and, in outcome, its grain's fate.
            """CREATE TABLE idempotency_keys (
                key TEXT PRIMARY KEY,
                content_hash TEXT NOT NULL,
                record_id TEXT NOT NULL,
                grain_id INTEGER NOT NULL,
                hour INTEGER NOT NULL,
                rolled_forward INTEGER NOT NULL,
                outcome TEXT,
                received_at REAL NOT NULL
            )""",
            "CREATE INDEX idempotency_keys_grain ON idempotency_keys (grain_id)",
            "CREATE INDEX idempotency_keys_received ON idempotency_keys (received_at)",
            """INSERT INTO idempotency_keys
                SELECT r.idempotency_key, r.content_hash, r.id, r.grain_id, g.hour,
                       r.rolled_forward, NULL, r.received_at
                FROM usage_records r JOIN grains g ON g.id = r.grain_id
                WHERE r.idempotency_key IS NOT NULL""",
        ],
    ),
    (
        3,
        [
            # The customer registry (app.queue.registry). Unknown identifiers are ''
            # so that lookups compare plain values; license_id is the l-... id
            # licenses are compared on.
            """CREATE TABLE customers (
                id INTEGER PRIMARY KEY,
                customer_identifier TEXT NOT NULL,
                customer_aws_account_id TEXT NOT NULL,
                license_arn TEXT NOT NULL,
                license_id TEXT NOT NULL,
                product_code TEXT NOT NULL,
                agreement_id TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN ('active', 'ending', 'ended')),
                ending_at REAL,
                grace_ends_at REAL,
                ended_at REAL,
                closed_at REAL,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL
            )""",
            "CREATE INDEX customers_identifier ON customers (customer_identifier)",
            "CREATE INDEX customers_account ON customers (customer_aws_account_id, license_id)",
            "CREATE INDEX customers_status ON customers (status, id)",
            "CREATE INDEX customers_closing ON customers (closed_at, grace_ends_at)",
            "CREATE INDEX customers_final_hour ON customers (status, ending_at)",
            # Every event applied, once: its id is unique. customer_id NULL: an
            # event that names no known customer (the events log).
            """CREATE TABLE customer_events (
                id INTEGER PRIMARY KEY,
                event_id TEXT NOT NULL UNIQUE,
                customer_id INTEGER REFERENCES customers (id) ON DELETE SET NULL,
                source TEXT NOT NULL,
                type TEXT NOT NULL,
                kind TEXT NOT NULL,
                time REAL,
                applied_at REAL NOT NULL,
                outcome TEXT NOT NULL,
                customer_identifier TEXT NOT NULL,
                customer_aws_account_id TEXT NOT NULL,
                license_arn TEXT NOT NULL,
                product_code TEXT NOT NULL,
                agreement_id TEXT NOT NULL
            )""",
            "CREATE INDEX customer_events_customer ON customer_events (customer_id, id)",
            # A leaving customer's open grains, found without reading its history.
            "CREATE INDEX grains_open_customer ON grains "
            "(customer_aws_account_id, customer_identifier) WHERE status = 'open'",
        ],
    ),
    (
        4,
        [
            # Grain ids are never used twice. Without AUTOINCREMENT SQLite gives a new
            # row the highest id plus one, so once the newest grains were pruned their
            # ids came back, and an IdempotencyKey replayed later (its key outlives its
            # grain) reported another customer's grain and status. SQLite changes a
            # column's definition by rebuilding the table (its documented procedure;
            # app.queue.sqlite runs migrations with foreign keys off, so dropping the
            # old table deletes none of the records that refer to it).
            """CREATE TABLE grains_next (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL CHECK (kind IN ('batch', 'meter')),
                product_code TEXT NOT NULL,
                license_arn TEXT NOT NULL,
                customer_identifier TEXT NOT NULL,
                customer_aws_account_id TEXT NOT NULL,
                dimension TEXT NOT NULL,
                hour INTEGER NOT NULL,
                status TEXT NOT NULL
                    CHECK (status IN ('open', 'frozen', 'accepted', 'rejected', 'expired')),
                content TEXT NOT NULL,
                due_at REAL NOT NULL,
                deadline REAL NOT NULL,
                payload TEXT,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at REAL,
                last_error TEXT,
                metering_record_id TEXT,
                reason TEXT,
                created_at REAL NOT NULL,
                frozen_at REAL,
                finished_at REAL,
                UNIQUE (kind, product_code, license_arn, customer_identifier,
                        customer_aws_account_id, dimension, hour)
            )""",
            "INSERT INTO grains_next SELECT * FROM grains",
            "DROP TABLE grains",
            "ALTER TABLE grains_next RENAME TO grains",
            "CREATE INDEX grains_status_due ON grains (status, due_at)",
            "CREATE INDEX grains_status_next ON grains (status, next_attempt_at)",
            "CREATE INDEX grains_status_deadline ON grains (status, deadline)",
            "CREATE INDEX grains_finished ON grains (finished_at)",
            "CREATE INDEX grains_open_customer ON grains "
            "(customer_aws_account_id, customer_identifier) WHERE status = 'open'",
            # Ids already handed out and pruned before this version are known only to
            # the IdempotencyKeys that remember them: the sequence starts past those too.
            """INSERT INTO sqlite_sequence (name, seq)
                SELECT 'grains', 0 WHERE NOT EXISTS
                    (SELECT 1 FROM sqlite_sequence WHERE name = 'grains')""",
            """UPDATE sqlite_sequence SET seq = MAX(seq,
                    COALESCE((SELECT MAX(grain_id) FROM idempotency_keys), 0),
                    COALESCE((SELECT MAX(id) FROM grains), 0))
                WHERE name = 'grains'""",
        ],
    ),
    (
        5,
        [
            # Indexes only: the previous version reads and writes the file as it did.
            # Pruning finds the grains settled before a moment by their status and that
            # moment: without statistics SQLite searched grains_status_deadline by status
            # alone and read every settled grain, the whole history, every hour.
            "CREATE INDEX grains_status_finished ON grains (status, finished_at)",
            # A customer's grains in id order, under either form: a page of them reads a
            # page (app.queue.queries.list_grains_query), not every grain.
            "CREATE INDEX grains_identifier ON grains (customer_identifier, id)",
            "CREATE INDEX grains_account ON grains (customer_aws_account_id, id)",
            # A page of grains of one status, or of one hour, read in id order (listing
            # by status searched a status index, then sorted every grain of that status:
            # for a settled one, the whole history).
            "CREATE INDEX grains_status_id ON grains (status, id)",
            "CREATE INDEX grains_hour ON grains (hour, id)",
        ],
    ),
    (
        6,
        [
            # Customers by status, kept by triggers as customers change: the metrics'
            # figure reads three rows, where counting read every customer ever known
            # (ended ones are kept). The previous version neither reads nor writes the
            # table; the triggers keep it right under its writes too.
            """CREATE TABLE customer_counts (
                status TEXT PRIMARY KEY,
                count INTEGER NOT NULL
            )""",
            """INSERT INTO customer_counts (status, count)
                SELECT s.status, (SELECT COUNT(*) FROM customers c WHERE c.status = s.status)
                FROM (SELECT 'active' AS status UNION ALL SELECT 'ending'
                      UNION ALL SELECT 'ended') s""",
            """CREATE TRIGGER customers_counted_insert AFTER INSERT ON customers
                BEGIN
                    UPDATE customer_counts SET count = count + 1 WHERE status = NEW.status;
                END""",
            """CREATE TRIGGER customers_counted_delete AFTER DELETE ON customers
                BEGIN
                    UPDATE customer_counts SET count = count - 1 WHERE status = OLD.status;
                END""",
            """CREATE TRIGGER customers_counted_update AFTER UPDATE OF status ON customers
                WHEN OLD.status IS NOT NEW.status
                BEGIN
                    UPDATE customer_counts SET count = count - 1 WHERE status = OLD.status;
                    UPDATE customer_counts SET count = count + 1 WHERE status = NEW.status;
                END""",
        ],
    ),
]

# PostgreSQL (app.queue.postgres): the same tables, with a claim (owner and lease)
# on grains so that exactly one replica sends each. Epoch seconds as in SQLite,
# so that both stores share their read-side SQL (app.queue.queries).
POSTGRES_MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE grains (
                id BIGSERIAL PRIMARY KEY,
                kind TEXT NOT NULL CHECK (kind IN ('batch', 'meter')),
                product_code TEXT NOT NULL,
                license_arn TEXT NOT NULL,
                customer_identifier TEXT NOT NULL,
                customer_aws_account_id TEXT NOT NULL,
                dimension TEXT NOT NULL,
                hour BIGINT NOT NULL,
                status TEXT NOT NULL
                    CHECK (status IN ('open', 'frozen', 'accepted', 'rejected', 'expired')),
                content TEXT NOT NULL,
                due_at DOUBLE PRECISION NOT NULL,
                deadline DOUBLE PRECISION NOT NULL,
                payload TEXT,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at DOUBLE PRECISION,
                last_error TEXT,
                metering_record_id TEXT,
                reason TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                frozen_at DOUBLE PRECISION,
                finished_at DOUBLE PRECISION,
                claimed_by TEXT,
                claim_expires_at DOUBLE PRECISION,
                UNIQUE (kind, product_code, license_arn, customer_identifier,
                        customer_aws_account_id, dimension, hour)
            )""",
            "CREATE INDEX grains_status_due ON grains (status, due_at)",
            "CREATE INDEX grains_status_next ON grains (status, next_attempt_at)",
            "CREATE INDEX grains_status_deadline ON grains (status, deadline)",
            "CREATE INDEX grains_finished ON grains (finished_at)",
            """CREATE TABLE usage_records (
                id TEXT PRIMARY KEY,
                idempotency_key TEXT UNIQUE,
                content_hash TEXT NOT NULL,
                grain_id BIGINT NOT NULL REFERENCES grains (id) ON DELETE CASCADE,
                original_hour BIGINT NOT NULL,
                rolled_forward INTEGER NOT NULL,
                record TEXT NOT NULL,
                customer TEXT NOT NULL,
                received_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX usage_records_grain ON usage_records (grain_id)",
            "CREATE INDEX usage_records_customer ON usage_records (customer, id)",
            "CREATE INDEX usage_records_hour ON usage_records (original_hour, id)",
            """CREATE TABLE idempotency_keys (
                key TEXT PRIMARY KEY,
                content_hash TEXT NOT NULL,
                record_id TEXT NOT NULL,
                grain_id BIGINT NOT NULL,
                hour BIGINT NOT NULL,
                rolled_forward INTEGER NOT NULL,
                outcome TEXT,
                received_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX idempotency_keys_grain ON idempotency_keys (grain_id)",
            "CREATE INDEX idempotency_keys_received ON idempotency_keys (received_at)",
        ],
    ),
    (
        2,
        [
            # The customer registry, as in SQLite's version 3. Additive: a replica
            # of an older version goes on working beside one of this version (it
            # neither reads nor writes these tables).
            """CREATE TABLE customers (
                id BIGSERIAL PRIMARY KEY,
                customer_identifier TEXT NOT NULL,
                customer_aws_account_id TEXT NOT NULL,
                license_arn TEXT NOT NULL,
                license_id TEXT NOT NULL,
                product_code TEXT NOT NULL,
                agreement_id TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN ('active', 'ending', 'ended')),
                ending_at DOUBLE PRECISION,
                grace_ends_at DOUBLE PRECISION,
                ended_at DOUBLE PRECISION,
                closed_at DOUBLE PRECISION,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX customers_identifier ON customers (customer_identifier)",
            "CREATE INDEX customers_account ON customers (customer_aws_account_id, license_id)",
            "CREATE INDEX customers_status ON customers (status, id)",
            "CREATE INDEX customers_closing ON customers (closed_at, grace_ends_at)",
            "CREATE INDEX customers_final_hour ON customers (status, ending_at)",
            """CREATE TABLE customer_events (
                id BIGSERIAL PRIMARY KEY,
                event_id TEXT NOT NULL UNIQUE,
                customer_id BIGINT REFERENCES customers (id) ON DELETE SET NULL,
                source TEXT NOT NULL,
                type TEXT NOT NULL,
                kind TEXT NOT NULL,
                time DOUBLE PRECISION,
                applied_at DOUBLE PRECISION NOT NULL,
                outcome TEXT NOT NULL,
                customer_identifier TEXT NOT NULL,
                customer_aws_account_id TEXT NOT NULL,
                license_arn TEXT NOT NULL,
                product_code TEXT NOT NULL,
                agreement_id TEXT NOT NULL
            )""",
            "CREATE INDEX customer_events_customer ON customer_events (customer_id, id)",
            "CREATE INDEX grains_open_customer ON grains "
            "(customer_aws_account_id, customer_identifier) WHERE status = 'open'",
        ],
    ),
    (
        3,
        [
            # What the replicas share beside the usage (app.queue.fleet). Additive: a
            # replica of an older version neither reads nor writes these tables.
            # The settings that shape grains, as the first replica wrote them (JSON text).
            """CREATE TABLE fleet_settings (
                name TEXT PRIMARY KEY,
                value TEXT NOT NULL,
                written_at DOUBLE PRECISION NOT NULL,
                written_by TEXT NOT NULL
            )""",
            # The account's request quota: per action, the theoretical arrival time of
            # its next request (epoch seconds on the database's clock).
            """CREATE TABLE fleet_quota (
                action TEXT PRIMARY KEY,
                tat DOUBLE PRECISION NOT NULL
            )""",
            # The replicas that checked in lately, and their clocks' skew.
            """CREATE TABLE fleet_members (
                owner TEXT PRIMARY KEY,
                seen_at DOUBLE PRECISION NOT NULL,
                skew DOUBLE PRECISION
            )""",
        ],
    ),
    (
        4,
        [
            # Indexes only (additive): a replica of an older version works beside one of
            # this version as before. A customer's grains in id order, under either form:
            # a page of them reads a page (app.queue.queries.list_grains_query), not every
            # grain.
            "CREATE INDEX grains_identifier ON grains (customer_identifier, id)",
            "CREATE INDEX grains_account ON grains (customer_aws_account_id, id)",
            # A page of grains of one status, or of one hour, in id order.
            "CREATE INDEX grains_status_id ON grains (status, id)",
            "CREATE INDEX grains_hour ON grains (hour, id)",
        ],
    ),
    (
        5,
        [
            # Customers by status, kept by a trigger as customers change (SQLite's 6):
            # the metrics' figure reads three rows, not every customer ever known. The
            # table is locked against writes while it is counted and the trigger made,
            # so no change falls between; a replica of an older version neither reads
            # nor writes the table, and the trigger keeps it right under its writes too.
            "LOCK TABLE customers IN SHARE ROW EXCLUSIVE MODE",
            """CREATE TABLE customer_counts (
                status TEXT PRIMARY KEY,
                count BIGINT NOT NULL
            )""",
            """INSERT INTO customer_counts (status, count)
                SELECT s.status, (SELECT COUNT(*) FROM customers c WHERE c.status = s.status)
                FROM (VALUES ('active'), ('ending'), ('ended')) AS s (status)""",
            """CREATE FUNCTION customers_counted() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF TG_OP = 'UPDATE' AND OLD.status IS NOT DISTINCT FROM NEW.status THEN
                        RETURN NULL;
                    END IF;
                    IF TG_OP IN ('UPDATE', 'DELETE') THEN
                        UPDATE customer_counts SET count = count - 1
                            WHERE status = OLD.status;
                    END IF;
                    IF TG_OP IN ('UPDATE', 'INSERT') THEN
                        UPDATE customer_counts SET count = count + 1
                            WHERE status = NEW.status;
                    END IF;
                    RETURN NULL;
                END
            $$""",
            """CREATE TRIGGER customers_counted
                AFTER INSERT OR DELETE OR UPDATE OF status ON customers
                FOR EACH ROW EXECUTE FUNCTION customers_counted()""",
        ],
    ),
]
