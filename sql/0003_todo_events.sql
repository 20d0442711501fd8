-- An audit trail: completing a todo writes here and to todos/users in one transaction.
CREATE TABLE todo_events (
    id       bigserial PRIMARY KEY,
    todo_id  bigint NOT NULL REFERENCES todos (id) ON DELETE CASCADE,
    user_id  bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind     text NOT NULL CHECK (kind IN ('completed')),
    at       timestamptz NOT NULL DEFAULT now()
);
