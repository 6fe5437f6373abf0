//! A per-tenant token bucket, in memory: each gateway process limits the
//! requests it sees (run N gateways, allow N times the rate).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

pub struct RateLimiter {
    rate_per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate_per_s: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            rate_per_s,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Ok when the request may pass; Err(seconds to wait) when not.
    pub fn check(&self, tenant: &str, now: Instant) -> Result<(), u64> {
        let mut b = match self.buckets.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        let (tokens, last) = b.entry(tenant.to_string()).or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate_per_s).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate_per_s).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let r = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        assert!(r.check("a", t0).is_ok());
        assert!(r.check("a", t0).is_ok());
        assert!(r.check("a", t0).is_ok());
        assert_eq!(r.check("a", t0), Err(1));
        // Tenants do not share a bucket.
        assert!(r.check("b", t0).is_ok());
        assert!(r.check("a", t0 + Duration::from_millis(600)).is_ok());
    }
}
