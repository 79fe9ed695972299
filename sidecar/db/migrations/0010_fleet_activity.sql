-- The fleet's activity log (safous-admin collect): decisions shipped by the sidecars land in
-- activity_log with the pod that decided them and the id the pod gave the record. A pod's own
-- rules.db leaves both NULL. A batch the collector wrote but whose answer was lost is sent
-- again: the unique id makes the second copy a no-op. Both indexes are partial, so a pod's
-- rules.db (every row NULL) pays nothing for them on its writes.
ALTER TABLE activity_log ADD COLUMN pod TEXT;
ALTER TABLE activity_log ADD COLUMN record_id TEXT;
CREATE UNIQUE INDEX activity_log_record_id ON activity_log(record_id) WHERE record_id IS NOT NULL;
-- "Does this log hold pods?" (the POD column, the portal's pod facet) and a pod's rows.
CREATE INDEX activity_log_pod ON activity_log(pod) WHERE pod IS NOT NULL;
