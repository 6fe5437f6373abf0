#![no_main]
//! Any HTTP body: decoding answers a job for the caller's tenant or a
//! refusal, never panics, never yields another tenant's job, and what it
//! accepts the workers accept too.
use libfuzzer_sys::fuzz_target;
use recap_job::{parse_job, parse_submission, Limits};

fuzz_target!(|data: &[u8]| {
    let id = uuid::Uuid::from_u128(0x5eed);
    if let Ok(job) = parse_submission(data, "acme", id, &Limits::default()) {
        assert_eq!(job.tenant, "acme");
        assert!(parse_job(&job.to_json(), &Limits::default()).is_ok());
    }
});
