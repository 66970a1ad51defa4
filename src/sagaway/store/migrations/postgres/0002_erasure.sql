-- Erasure and retention: when a run's payloads were erased (NULL: never). Retention purges
-- finished runs whose payloads are still there.
ALTER TABLE sagaway_runs ADD COLUMN IF NOT EXISTS erased_at double precision;
