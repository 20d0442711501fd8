CREATE TABLE notes (
  id bigserial PRIMARY KEY,
  body text NOT NULL CHECK (body <> ''),
  done boolean NOT NULL DEFAULT false
);
