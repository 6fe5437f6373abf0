-- Transcripts of shadow-sampled jobs, kept beside the large tier's shadow
-- summaries so that `recap train --data shadow` can distil them into the
-- compact tier. Only jobs the policy samples for a shadow run keep their
-- transcript here (policy.toml [shadow] rate); delete rows to forget them.
CREATE TABLE shadow_transcripts (
    job_id     uuid PRIMARY KEY REFERENCES jobs (job_id),
    tenant     text NOT NULL,
    language   text,
    transcript jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
