-- A seed row every environment has: tests add customers beside it, rename or delete it.
INSERT INTO customers (name) VALUES ('house account');
