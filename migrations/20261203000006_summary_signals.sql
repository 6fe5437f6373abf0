-- What the cascade knew of each output: the model's confidence in its own
-- tokens and the share of sentences copied from the transcript. Calibrating
-- the routing score (`recap policy calibrate --shadow`) reads them beside
-- the large tier's shadow output of the same job.
ALTER TABLE summaries
    ADD COLUMN mean_logprob double precision,
    ADD COLUMN mean_entropy double precision,
    ADD COLUMN copy_rate double precision;
