INSERT INTO users (email, admin) VALUES ('admin@example.com', true);
