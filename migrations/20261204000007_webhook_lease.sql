-- The dispatcher's claim on a delivery: the final update of an attempt is
-- guarded on it, so that a delivery re-claimed by another gateway is
-- recorded once.
ALTER TABLE webhook_deliveries ADD COLUMN lease uuid;
