-- recap's tables. Operators and outside tools read these names: keep them stable.
-- Forward-only: change the schema with a new migration, never by editing this one.

CREATE TABLE jobs (
    job_id        uuid PRIMARY KEY,
    tenant        text NOT NULL,
    status        text NOT NULL
                  CHECK (status IN ('queued', 'routed', 'running', 'succeeded', 'failed', 'dead')),
    quality       text,
    language      text,
    summary_kinds text[] NOT NULL DEFAULT '{}',
    metadata      jsonb,
    callback_url  text,
    input_bytes   integer,
    utterances    integer,
    tier          text,
    model         text,
    chunks        integer,
    attempts      integer NOT NULL DEFAULT 0,
    -- machine-readable reason for failed/dead jobs, and the human sentence
    error_code    text,
    error         text,
    cost_usd      numeric(14, 8),
    queued_at     timestamptz,
    routed_at     timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at DESC);
CREATE INDEX jobs_status ON jobs (status);

CREATE TABLE summaries (
    job_id         uuid NOT NULL REFERENCES jobs (job_id),
    kind           text NOT NULL,
    text           text NOT NULL,
    model          text NOT NULL,
    engine         text NOT NULL,
    input_tokens   integer NOT NULL,
    output_tokens  integer NOT NULL,
    prefill_ms     double precision NOT NULL DEFAULT 0,
    decode_ms      double precision NOT NULL DEFAULT 0,
    total_ms       double precision NOT NULL DEFAULT 0,
    -- shadow outputs (policy calibration) are recorded, never returned
    shadow         boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, kind, shadow)
);

CREATE TABLE route_decisions (
    id                 bigserial PRIMARY KEY,
    job_id             uuid NOT NULL REFERENCES jobs (job_id),
    tier               text NOT NULL,
    model              text NOT NULL,
    reason             text NOT NULL,
    features           jsonb NOT NULL,
    estimated_cost_usd numeric(14, 8) NOT NULL DEFAULT 0,
    policy_version     text,
    decided_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX route_decisions_job ON route_decisions (job_id);

-- One row per cost event: an estimate when a job is routed, the actual cost
-- when it completes. Budgets are checked against the sum of these.
CREATE TABLE usage_ledger (
    id            bigserial PRIMARY KEY,
    tenant        text NOT NULL,
    job_id        uuid REFERENCES jobs (job_id),
    tier          text NOT NULL,
    model         text NOT NULL,
    entry         text NOT NULL CHECK (entry IN ('estimate', 'actual', 'shadow')),
    input_tokens  integer NOT NULL DEFAULT 0,
    output_tokens integer NOT NULL DEFAULT 0,
    cost_usd      numeric(14, 8) NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_ledger_tenant_time ON usage_ledger (tenant, created_at);
-- a job's actual cost is booked once, however often it is redelivered
CREATE UNIQUE INDEX usage_ledger_one_actual ON usage_ledger (job_id, entry, tier) WHERE entry <> 'estimate';
