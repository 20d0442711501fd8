-- Users of the todo app. An email address belongs to one user only.
CREATE TABLE users (
    id              bigserial PRIMARY KEY,
    email           text NOT NULL UNIQUE CHECK (position('@' IN email) > 1),
    name            text NOT NULL CHECK (length(trim(name)) > 0),
    completed_count integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);
