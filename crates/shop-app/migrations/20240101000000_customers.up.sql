-- Written as a team writes it for `sqlx migrate run`: its own transaction.
BEGIN;
CREATE TABLE customers (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (name <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMIT;
