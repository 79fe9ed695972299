
    CREATE TABLE admin_context (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        actor TEXT NOT NULL CHECK (actor <> '')
    );
    CREATE TABLE audit_pending (
        seq INTEGER PRIMARY KEY,
        object_type TEXT NOT NULL,
        object_id INTEGER NOT NULL,
        before TEXT,
        before_raw TEXT,
        UNIQUE (object_type, object_id)
    );
    CREATE VIEW audit_rule_doc AS
        SELECT id, name, json_object('name', name, 'enabled', json(CASE WHEN enabled THEN 'true' ELSE 'false' END), 'method', method, 'url', url, 'headers', CASE WHEN json_valid(headers) AND json_type(headers) = 'array' THEN (SELECT json_group_array(CASE WHEN type = 'array' AND lower(json_extract(value, '$[0]')) IN ('authorization', 'proxy-authorization') THEN json_array(json_extract(value, '$[0]'), '••••••') WHEN type IN ('array', 'object') THEN json(value) ELSE value END) FROM json_each(headers)) ELSE headers END, 'body', body, 'auth', auth_type, 'username', auth_username, 'password', CASE WHEN auth_password IS NULL THEN NULL WHEN substr(auth_password, 1, 4) = 'env:' OR substr(auth_password, 1, 5) = 'file:' THEN auth_password ELSE '••••••' END, 'token_url', oauth_token_url, 'client_id', oauth_client_id, 'client_secret', CASE WHEN oauth_client_secret IS NULL THEN NULL WHEN substr(oauth_client_secret, 1, 4) = 'env:' OR substr(oauth_client_secret, 1, 5) = 'file:' THEN oauth_client_secret ELSE '••••••' END, 'verification', verification, 'actions', CASE WHEN json_valid(actions) THEN json(actions) ELSE actions END, 'timeout_ms', timeout_ms, 'cache_ttl', cache_ttl) AS doc, json_object('name', name, 'enabled', json(CASE WHEN enabled THEN 'true' ELSE 'false' END), 'method', method, 'url', url, 'headers', CASE WHEN json_valid(headers) THEN json(headers) ELSE headers END, 'body', body, 'auth', auth_type, 'username', auth_username, 'password', auth_password, 'token_url', oauth_token_url, 'client_id', oauth_client_id, 'client_secret', oauth_client_secret, 'verification', verification, 'actions', CASE WHEN json_valid(actions) THEN json(actions) ELSE actions END, 'timeout_ms', timeout_ms, 'cache_ttl', cache_ttl) AS raw FROM rules;
    CREATE VIEW audit_policy_doc AS
        SELECT id, name, doc, doc AS raw FROM (SELECT p.id, p.name, json_object('name', p.name, 'enabled', json(CASE WHEN p.enabled THEN 'true' ELSE 'false' END), 'hosts', CASE WHEN json_valid(p.hosts) THEN json(p.hosts) ELSE p.hosts END, 'path_prefix', p.path_prefix, 'methods', CASE WHEN json_valid(p.methods) THEN json(p.methods) ELSE p.methods END, 'integration', json(CASE WHEN p.integration THEN 'true' ELSE 'false' END), 'priority', p.priority, 'rules', (SELECT json_group_array(name) FROM (SELECT r.name FROM policy_rules pr JOIN rules r ON r.id = pr.rule_id WHERE pr.policy_id = p.id ORDER BY pr.position))) AS doc FROM policies p);
    CREATE INDEX audit_log_at ON audit_log(at);
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: its rows cannot be changed'); END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: its rows cannot be deleted'); END;
CREATE TRIGGER audit_rules_before_insert BEFORE INSERT ON rules BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'rule', id, doc, raw FROM audit_rule_doc d WHERE d.name = NEW.name AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'rule' AND k.object_id = d.id); END;
CREATE TRIGGER audit_rules_before_update BEFORE UPDATE ON rules BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'rule', id, doc, raw FROM audit_rule_doc d WHERE d.id = OLD.id AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'rule' AND k.object_id = d.id); END;
CREATE TRIGGER audit_rules_before_delete BEFORE DELETE ON rules BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'rule', id, doc, raw FROM audit_rule_doc d WHERE d.id = OLD.id AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'rule' AND k.object_id = d.id); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
CREATE TRIGGER audit_policies_before_insert BEFORE INSERT ON policies BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'policy', id, doc, raw FROM audit_policy_doc d WHERE d.name = NEW.name AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'policy' AND k.object_id = d.id); END;
CREATE TRIGGER audit_policies_before_update BEFORE UPDATE ON policies BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'policy', id, doc, raw FROM audit_policy_doc d WHERE d.id = OLD.id AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'policy' AND k.object_id = d.id); END;
CREATE TRIGGER audit_policies_before_delete BEFORE DELETE ON policies BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'policy', id, doc, raw FROM audit_policy_doc d WHERE d.id = OLD.id AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'policy' AND k.object_id = d.id); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
CREATE TRIGGER audit_policy_rules_before_insert BEFORE INSERT ON policy_rules BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'policy', id, doc, raw FROM audit_policy_doc d WHERE d.id = NEW.policy_id AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'policy' AND k.object_id = d.id); END;
CREATE TRIGGER audit_policy_rules_before_update BEFORE UPDATE ON policy_rules BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'policy', id, doc, raw FROM audit_policy_doc d WHERE d.id = OLD.policy_id AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'policy' AND k.object_id = d.id); INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'policy', id, doc, raw FROM audit_policy_doc d WHERE d.id = NEW.policy_id AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'policy' AND k.object_id = d.id); END;
CREATE TRIGGER audit_policy_rules_before_delete BEFORE DELETE ON policy_rules BEGIN INSERT INTO audit_pending (object_type, object_id, before, before_raw) SELECT 'policy', id, doc, raw FROM audit_policy_doc d WHERE d.id = OLD.policy_id AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = 'policy' AND k.object_id = d.id); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
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
              FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context))
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE NOT EXISTS (SELECT 1 FROM admin_context); END;
CREATE TRIGGER admin_context_flush AFTER DELETE ON admin_context BEGIN 
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT OLD.actor,
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
              FROM audit_pending WHERE 1)
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE 1; END;
