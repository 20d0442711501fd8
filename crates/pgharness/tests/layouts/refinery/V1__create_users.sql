CREATE TABLE users (id serial PRIMARY KEY, email text NOT NULL, admin boolean NOT NULL DEFAULT false);
