//! Tenants and their API keys. Keys are random, shown once, and stored only
//! as SHA-256 hashes; lookups compare hashes in constant time. Webhook
//! secrets are stored as they are, since signing needs them.

use crate::config::Config;
use crate::store;
use anyhow::{bail, Result};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

#[derive(clap::Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant; prints its first API key and its webhook secret.
    Create { tenant: String },
    /// Issue a new key and revoke the tenant's others, in one transaction.
    Rotate {
        tenant: String,
        /// Seconds the old keys stay valid, so that clients can switch over.
        #[arg(long, default_value_t = 0)]
        grace_s: u64,
    },
    /// Revoke every key of the tenant, or only the one with `--key`.
    Revoke {
        tenant: String,
        /// The key's prefix as `recap tenants list` shows it (e.g. rk_1a2b3c4).
        #[arg(long)]
        key: Option<String>,
    },
    /// Tenants and their live keys' prefixes (never the keys).
    List,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

async fn issue_key<'e>(db: impl sqlx::PgExecutor<'e>, tenant: &str) -> Result<String> {
    let key = format!("rk_{}", random_hex(24));
    sqlx::query("INSERT INTO api_keys (tenant, key_hash, key_prefix) VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(hash_key(&key))
        .bind(&key[..10])
        .execute(db)
        .await?;
    Ok(key)
}

/// Revokes the tenant's live keys (those matching `prefix`, where given)
/// as of `grace_s` seconds from now; how many.
async fn revoke<'e>(
    db: impl sqlx::PgExecutor<'e>,
    tenant: &str,
    prefix: Option<&str>,
    grace_s: u64,
) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE api_keys SET revoked_at = now() + make_interval(secs => $3)
         WHERE tenant = $1 AND ($2::text IS NULL OR key_prefix = $2)
           AND (revoked_at IS NULL OR revoked_at > now())",
    )
    .bind(tenant)
    .bind(prefix)
    .bind(grace_s as f64)
    .execute(db)
    .await?
    .rows_affected())
}

async fn exists(pool: &PgPool, tenant: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE tenant = $1)")
            .bind(tenant)
            .fetch_one(pool)
            .await?,
    )
}

pub async fn run(config: &Config, cmd: TenantsCommand) -> Result<()> {
    let pool = store::connect(config).await?;
    match cmd {
        TenantsCommand::Create { tenant } => {
            if !recap_job::valid_tenant(&tenant, config.limits.max_tenant_len) {
                bail!(
                    "tenant names are 1-{} characters of A-Z, a-z, 0-9, '.', '_', '-'",
                    config.limits.max_tenant_len
                );
            }
            if exists(&pool, &tenant).await? {
                bail!("tenant {tenant} exists; use `recap tenants rotate {tenant}` for a new key");
            }
            let secret = format!("whsec_{}", random_hex(24));
            sqlx::query("INSERT INTO tenants (tenant, webhook_secret) VALUES ($1, $2)")
                .bind(&tenant)
                .bind(&secret)
                .execute(&pool)
                .await?;
            let key = issue_key(&pool, &tenant).await?;
            println!("tenant:         {tenant}\napi key:        {key}\nwebhook secret: {secret}\n(the key is shown once; only its hash is stored)");
        }
        TenantsCommand::Rotate { tenant, grace_s } => {
            if !exists(&pool, &tenant).await? {
                bail!("no tenant {tenant}");
            }
            // One transaction: a failure leaves the old keys working.
            let mut tx = pool.begin().await?;
            let n = revoke(&mut *tx, &tenant, None, grace_s).await?;
            let key = issue_key(&mut *tx, &tenant).await?;
            tx.commit().await?;
            let when = if grace_s == 0 {
                "now".to_string()
            } else {
                format!("in {grace_s} s")
            };
            println!("revoked {n} key(s) of {tenant} ({when})\nnew api key: {key}");
        }
        TenantsCommand::Revoke { tenant, key } => {
            if !exists(&pool, &tenant).await? {
                bail!("no tenant {tenant}");
            }
            let n = revoke(&pool, &tenant, key.as_deref(), 0).await?;
            if key.is_some() && n == 0 {
                bail!("{tenant} has no live key with that prefix (see `recap tenants list`)");
            }
            println!("revoked {n} key(s) of {tenant}");
        }
        TenantsCommand::List => {
            let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
                "SELECT t.tenant, coalesce(array_agg(k.key_prefix ORDER BY k.id)
                            FILTER (WHERE k.id IS NOT NULL AND (k.revoked_at IS NULL OR k.revoked_at > now())), '{}')
                 FROM tenants t LEFT JOIN api_keys k ON k.tenant = t.tenant GROUP BY t.tenant ORDER BY t.tenant",
            )
            .fetch_all(&pool)
            .await?;
            for (t, keys) in rows {
                println!("{t}\t{} live key(s)\t{}", keys.len(), keys.join(" "));
            }
        }
    }
    Ok(())
}

/// The tenant a presented key belongs to, if the key is live.
pub async fn authenticate(pool: &PgPool, presented: &str) -> Result<Option<String>, sqlx::Error> {
    use subtle::ConstantTimeEq;
    let hash = hash_key(presented);
    let row: Option<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT tenant, key_hash FROM api_keys
         WHERE key_hash = $1 AND (revoked_at IS NULL OR revoked_at > now())",
    )
    .bind(&hash)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(tenant, stored)| bool::from(stored.ct_eq(&hash)).then_some(tenant)))
}
