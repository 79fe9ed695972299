
        CREATE TABLE rules (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            method TEXT NOT NULL DEFAULT 'GET',
            url TEXT NOT NULL,
            headers TEXT NOT NULL DEFAULT '[]',      -- JSON [[key, value], ...], in order
            body TEXT,                               -- POST body template
            auth_type TEXT NOT NULL DEFAULT 'none',  -- none | basic | oauth
            auth_username TEXT,
            auth_password TEXT,                      -- clear, or env:NAME / file:PATH
            oauth_token_url TEXT,
            oauth_client_id TEXT,
            oauth_client_secret TEXT,                -- clear, or env:NAME / file:PATH
            verification TEXT NOT NULL DEFAULT 'json', -- json | jsonp
            actions TEXT NOT NULL DEFAULT '[]',      -- JSON [{"type","key","value"}, ...]
            timeout_ms INTEGER NOT NULL DEFAULT 1000,
            cache_ttl REAL NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE TABLE policies (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            hosts TEXT NOT NULL DEFAULT '[]',        -- JSON ["app.example.com", "*.example.com"]
            path_prefix TEXT NOT NULL DEFAULT '/',
            methods TEXT NOT NULL DEFAULT '[]',      -- JSON ["GET", ...]; [] = any
            integration INTEGER NOT NULL DEFAULT 1 CHECK (integration IN (0, 1)),
            priority INTEGER NOT NULL DEFAULT 100,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE TABLE policy_rules (
            policy_id INTEGER NOT NULL REFERENCES policies(id) ON DELETE CASCADE,
            rule_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE RESTRICT,
            position INTEGER NOT NULL,
            PRIMARY KEY (policy_id, rule_id),
            UNIQUE (policy_id, position)
        );
        CREATE INDEX policy_rules_rule ON policy_rules(rule_id);
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            actor TEXT NOT NULL,
            action TEXT NOT NULL,                    -- create | edit | enable | disable | delete
            object_type TEXT NOT NULL,               -- rule | policy
            object_name TEXT NOT NULL,
            before TEXT,                             -- JSON, secrets redacted
            after TEXT
        );
        CREATE TABLE activity_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            request_id TEXT NOT NULL,
            username TEXT NOT NULL,
            source_ip TEXT NOT NULL,
            host TEXT NOT NULL,
            path TEXT NOT NULL,
            method TEXT NOT NULL,
            policy TEXT,
            allowed INTEGER NOT NULL,
            code TEXT NOT NULL,
            status TEXT NOT NULL,                    -- the denial reason, or why it was allowed
            latency_ms REAL NOT NULL
        );
        CREATE INDEX activity_log_at ON activity_log(at);
        -- Bumped by triggers on every change to rules, policies or their links, including
        -- plain-SQL edits, so the server reloads on those and not on activity-log writes.
        CREATE TABLE rules_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
        INSERT INTO rules_version (id, version) VALUES (1, 0);
        CREATE TRIGGER rules_insert_bumps_version AFTER INSERT ON rules BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER rules_update_bumps_version AFTER UPDATE ON rules BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER rules_delete_bumps_version AFTER DELETE ON rules BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER policies_insert_bumps_version AFTER INSERT ON policies BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER policies_update_bumps_version AFTER UPDATE ON policies BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER policies_delete_bumps_version AFTER DELETE ON policies BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER policy_rules_insert_bumps_version AFTER INSERT ON policy_rules BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER policy_rules_update_bumps_version AFTER UPDATE ON policy_rules BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER policy_rules_delete_bumps_version AFTER DELETE ON policy_rules BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;
