DELETE FROM customers WHERE name = 'house account';
