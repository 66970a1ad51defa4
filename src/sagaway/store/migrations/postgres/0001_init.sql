-- The saga log: one row per run (its state document and queryable metadata) and the
-- append-only history of its transitions. Times are seconds since the epoch (double
-- precision), stamped with the database clock for leases. Documents are JSON, not JSONB:
-- JSON keeps the text exactly (1e308 stays a float, -0.0 stays -0.0, key order stays).
CREATE TABLE IF NOT EXISTS sagaway_runs (
    id              TEXT PRIMARY KEY,
    saga            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    status          TEXT NOT NULL,
    input           JSON NOT NULL,
    input_hash      TEXT NOT NULL,
    state           JSON NOT NULL,
    error           TEXT,
    idempotency_key TEXT,
    owner           TEXT,
    lease_expires   DOUBLE PRECISION,
    wake_at         DOUBLE PRECISION,
    row_version     BIGINT NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    request         JSON
) WITH (fillfactor = 70);  -- room on each page for HOT updates: transitions touch no index

CREATE UNIQUE INDEX IF NOT EXISTS sagaway_runs_key ON sagaway_runs (saga, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS sagaway_runs_active ON sagaway_runs (lease_expires)
    WHERE status IN ('PENDING', 'RUNNING', 'COMPENSATING');
CREATE INDEX IF NOT EXISTS sagaway_runs_requests ON sagaway_runs (id)
    WHERE request IS NOT NULL;
CREATE INDEX IF NOT EXISTS sagaway_runs_created ON sagaway_runs (created_at, id);
CREATE INDEX IF NOT EXISTS sagaway_runs_status_created ON sagaway_runs (status, created_at, id);

-- One row per durable transition: seq is the run's row version after it, entries the
-- timeline lines it appended (JSON array). One index.
CREATE TABLE IF NOT EXISTS sagaway_history (
    run_id  TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    entries JSON NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- The transactional outbox: messages written with the transition that emits them, relayed
-- to the broker and marked sent only after the broker confirmed them.
CREATE TABLE IF NOT EXISTS sagaway_outbox (
    id            TEXT PRIMARY KEY,
    destination   TEXT NOT NULL,
    body          TEXT NOT NULL,
    run_id        TEXT,
    created_at    DOUBLE PRECISION NOT NULL,
    owner         TEXT,
    lease_expires DOUBLE PRECISION,
    attempts      INTEGER NOT NULL DEFAULT 0,
    sent_at       DOUBLE PRECISION
);

CREATE INDEX IF NOT EXISTS sagaway_outbox_unsent ON sagaway_outbox (created_at, id)
    WHERE sent_at IS NULL;
