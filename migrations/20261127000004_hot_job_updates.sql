-- A job's status changes four times (queued, routed, running, succeeded).
-- With an index on status, every change is a non-HOT update that inserts a
-- tuple into each of the table's three indexes; nothing queries jobs by
-- status (the API reads by id, listings by tenant and time), so the index
-- goes. Free space on each page lets those updates stay on the page (HOT):
-- measured on the pipeline benchmark, PostgreSQL was the busiest process.
DROP INDEX IF EXISTS jobs_status;
ALTER TABLE jobs SET (fillfactor = 70);
