CREATE TABLE traces (
    id INTEGER PRIMARY KEY,
    activity_id INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX traces_activity ON traces(activity_id);
CREATE TRIGGER activity_log_delete_drops_trace AFTER DELETE ON activity_log
    BEGIN DELETE FROM traces WHERE activity_id = OLD.id; END;
