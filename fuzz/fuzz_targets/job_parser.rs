#![no_main]
//! Any bytes off the broker: the parser answers Ok or a Rejection, never
//! panics; and a job it accepts is accepted again after serialization (the
//! gateway and router re-publish what they parsed).
use libfuzzer_sys::fuzz_target;
use recap_job::{parse_job, Limits};

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = parse_job(data, &Limits::default()) {
        let again = parse_job(&job.to_json(), &Limits::default());
        assert!(again.is_ok(), "{again:?}");
    }
});
