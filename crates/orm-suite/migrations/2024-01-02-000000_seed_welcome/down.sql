DELETE FROM notes WHERE body = 'welcome';
