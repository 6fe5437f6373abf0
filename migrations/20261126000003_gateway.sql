-- Tenants, their API keys (stored only as SHA-256 hashes) and webhook
-- secrets, and a record of every webhook delivery attempt.
CREATE TABLE tenants (
    tenant          text PRIMARY KEY,
    webhook_secret  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL REFERENCES tenants (tenant),
    key_hash    bytea NOT NULL UNIQUE,
    -- the first characters, to tell keys apart in listings; never the key
    key_prefix  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);

-- The webhook outbox: a row is written in the same transaction as the
-- job's end, and delivered (with retries) by the gateway's dispatcher.
CREATE TABLE webhook_deliveries (
    id            bigserial PRIMARY KEY,
    job_id        uuid NOT NULL REFERENCES jobs (job_id),
    tenant        text NOT NULL,
    url           text NOT NULL,
    event         text NOT NULL,
    payload       jsonb NOT NULL,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status   integer,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz,
    UNIQUE (job_id, event)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id),
    attempt      integer NOT NULL,
    http_status  integer,
    error        text,
    duration_ms  double precision NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now()
);
