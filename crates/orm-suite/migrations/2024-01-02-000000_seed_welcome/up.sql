-- Every deployment starts with this note; tests add, change and delete notes.
INSERT INTO notes (body) VALUES ('welcome');
