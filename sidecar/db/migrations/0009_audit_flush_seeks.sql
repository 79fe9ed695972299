-- The audit triggers' flush after each written row. In an admin transaction (admin_context
-- holds the actor) it does nothing, but `WHERE NOT EXISTS (SELECT 1 FROM admin_context)` was
-- tested against every pending row: one scan of audit_pending per row written, quadratic in a
-- transaction (a 10,000-policy import or bundle spent 10 s there). An empty rowid range costs
-- one seek; outside admin transactions the range is every pending row, as before.
DROP TRIGGER audit_policies_after_delete;
CREATE TRIGGER audit_policies_after_delete AFTER DELETE ON policies BEGIN 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
DROP TRIGGER audit_policies_after_insert;
CREATE TRIGGER audit_policies_after_insert AFTER INSERT ON policies BEGIN INSERT INTO audit_pending (object_type, object_id) SELECT 'policy', NEW.id WHERE NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'policy' AND k.object_id = NEW.id); 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
DROP TRIGGER audit_policies_after_update;
CREATE TRIGGER audit_policies_after_update AFTER UPDATE ON policies BEGIN 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
DROP TRIGGER audit_policy_rules_after_delete;
CREATE TRIGGER audit_policy_rules_after_delete AFTER DELETE ON policy_rules BEGIN 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
DROP TRIGGER audit_policy_rules_after_insert;
CREATE TRIGGER audit_policy_rules_after_insert AFTER INSERT ON policy_rules BEGIN 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
DROP TRIGGER audit_policy_rules_after_update;
CREATE TRIGGER audit_policy_rules_after_update AFTER UPDATE ON policy_rules BEGIN 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
DROP TRIGGER audit_rules_after_delete;
CREATE TRIGGER audit_rules_after_delete AFTER DELETE ON rules BEGIN 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
DROP TRIGGER audit_rules_after_insert;
CREATE TRIGGER audit_rules_after_insert AFTER INSERT ON rules BEGIN INSERT INTO audit_pending (object_type, object_id) SELECT 'rule', NEW.id WHERE NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'rule' AND k.object_id = NEW.id); 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
DROP TRIGGER audit_rules_after_update;
CREATE TRIGGER audit_rules_after_update AFTER UPDATE ON rules BEGIN 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT 'sql',
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, '$.password', CASE WHEN json_extract(before_raw, '$.password') IS NOT json_extract(after_raw, '$.password') AND json_extract(before, '$.password') IS json_extract(after, '$.password') AND json_extract(after, '$.password') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.password') END, '$.client_secret', CASE WHEN json_extract(before_raw, '$.client_secret') IS NOT json_extract(after_raw, '$.client_secret') AND json_extract(before, '$.client_secret') IS json_extract(after, '$.client_secret') AND json_extract(after, '$.client_secret') IS NOT NULL THEN '•••••• (changed)' ELSE json_extract(after, '$.client_secret') END)
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE seq BETWEEN 1 AND (SELECT CASE WHEN EXISTS (SELECT 1 FROM admin_context) THEN 0 ELSE 9223372036854775807 END); END;
