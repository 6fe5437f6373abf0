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
    /// Revoke the tenant's keys and issue a new one.
    Rotate { tenant: String },
    /// Revoke every key of the tenant.
    Revoke { tenant: String },
    /// Tenants and how many live keys each has (never the keys).
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

async fn issue_key(pool: &PgPool, tenant: &str) -> Result<String> {
    let key = format!("rk_{}", random_hex(24));
    sqlx::query("INSERT INTO api_keys (tenant, key_hash, key_prefix) VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(hash_key(&key))
        .bind(&key[..10])
        .execute(pool)
        .await?;
    Ok(key)
}

async fn revoke_all(pool: &PgPool, tenant: &str) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE tenant = $1 AND revoked_at IS NULL",
    )
    .bind(tenant)
    .execute(pool)
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
        TenantsCommand::Rotate { tenant } => {
            if !exists(&pool, &tenant).await? {
                bail!("no tenant {tenant}");
            }
            let n = revoke_all(&pool, &tenant).await?;
            let key = issue_key(&pool, &tenant).await?;
            println!("revoked {n} key(s) of {tenant}\nnew api key: {key}");
        }
        TenantsCommand::Revoke { tenant } => {
            if !exists(&pool, &tenant).await? {
                bail!("no tenant {tenant}");
            }
            let n = revoke_all(&pool, &tenant).await?;
            println!("revoked {n} key(s) of {tenant}");
        }
        TenantsCommand::List => {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT t.tenant, count(k.id) FILTER (WHERE k.revoked_at IS NULL)
                 FROM tenants t LEFT JOIN api_keys k ON k.tenant = t.tenant GROUP BY t.tenant ORDER BY t.tenant",
            )
            .fetch_all(&pool)
            .await?;
            for (t, n) in rows {
                println!("{t}\t{n} live key(s)");
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
        "SELECT tenant, key_hash FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(&hash)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(tenant, stored)| bool::from(stored.ct_eq(&hash)).then_some(tenant)))
}
