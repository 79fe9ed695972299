-- The signed bundle whose rules and policies this rules.db holds (safous-sidecar serve --bundle):
-- no row until a revision is applied, then the last one applied. Written in the same transaction
-- as the rules and policies it brought, so the two never disagree.
CREATE TABLE bundle_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision TEXT NOT NULL,                  -- "<sequence>-<first 12 hex of content_sha256>"
    sequence INTEGER NOT NULL,               -- only a greater one is applied next
    content_sha256 TEXT NOT NULL,            -- of the bundle's rules and policies (canonical JSON)
    key_id TEXT,                             -- the key that signed it; NULL: applied unverified
    source TEXT NOT NULL,                    -- the file or URL it came from
    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
