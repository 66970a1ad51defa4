-- The saga log: one row per run (its state document and queryable metadata) and the
-- append-only history of its transitions.
CREATE TABLE sagaway_runs (
    id              TEXT PRIMARY KEY,
    saga            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    status          TEXT NOT NULL,
    input           TEXT NOT NULL,
    input_hash      TEXT NOT NULL,
    state           TEXT NOT NULL,
    error           TEXT,
    idempotency_key TEXT,
    owner           TEXT,
    lease_expires   REAL,
    wake_at         REAL,
    row_version     INTEGER NOT NULL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    request         TEXT
);

CREATE UNIQUE INDEX sagaway_runs_key ON sagaway_runs (saga, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX sagaway_runs_active ON sagaway_runs (status, lease_expires)
    WHERE status IN ('PENDING', 'RUNNING', 'COMPENSATING');
CREATE INDEX sagaway_runs_owner ON sagaway_runs (owner) WHERE owner IS NOT NULL;
CREATE INDEX sagaway_runs_requests ON sagaway_runs (id) WHERE request IS NOT NULL;
CREATE INDEX sagaway_runs_created ON sagaway_runs (created_at, id);
CREATE INDEX sagaway_runs_status_created ON sagaway_runs (status, created_at, id);

-- One row per durable transition: seq is the run's row version after it, entries the
-- timeline lines it appended (JSON array). Rows are appended in rowid order; the index finds
-- a run's rows.
CREATE TABLE sagaway_history (
    run_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    entries TEXT NOT NULL
);

CREATE UNIQUE INDEX sagaway_history_run ON sagaway_history (run_id, seq);

-- The transactional outbox: messages written with the transition that emits them, relayed
-- to the broker and marked sent only after the broker confirmed them.
CREATE TABLE sagaway_outbox (
    id            TEXT PRIMARY KEY,
    destination   TEXT NOT NULL,
    body          TEXT NOT NULL,
    run_id        TEXT,
    created_at    REAL NOT NULL,
    owner         TEXT,
    lease_expires REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    sent_at       REAL
);

CREATE INDEX sagaway_outbox_unsent ON sagaway_outbox (created_at, id) WHERE sent_at IS NULL;
