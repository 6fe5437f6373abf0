-- Tenant budgets: the router locks a tenant's row while it decides, so
-- two routers never spend the same dollar twice.
CREATE TABLE tenant_budgets (
    tenant      text PRIMARY KEY,
    daily_usd   numeric(14, 8),
    monthly_usd numeric(14, 8),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (daily_usd IS NULL OR daily_usd >= 0),
    CHECK (monthly_usd IS NULL OR monthly_usd >= 0)
);

ALTER TABLE route_decisions ADD COLUMN shadow boolean NOT NULL DEFAULT false;
ALTER TABLE route_decisions ADD COLUMN trail jsonb;
