-- Optional tracing (events/tracing.py): the W3C traceparent of each task's `create` span,
-- written only while tracing is on, before the task commits (so no claim can miss it:
-- hence no foreign key). Rows older than the retention are pruned with the history.
CREATE TABLE task_traces (
    task_id      text PRIMARY KEY,
    traceparent  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX task_traces_created ON task_traces (created_at);
