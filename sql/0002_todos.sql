-- Todos belong to a user; a user cannot have two todos with the same title.
CREATE TABLE todos (
    id           bigserial PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title        text NOT NULL CHECK (length(trim(title)) > 0),
    done         boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    UNIQUE (user_id, title)
);

CREATE INDEX todos_by_user ON todos (user_id, id);
