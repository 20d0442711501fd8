-- The benchmark's migration set: the shape of a real app (20 tables, 60 indexes,
-- 30 foreign keys, a trigger, a view, identity and serial columns). `cargo xtask bench`
-- measures acquire and reset on it. Generated once; edit freely, the bench only counts on its shape.

CREATE TABLE t00_accounts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE TABLE t01_users (
    id bigserial PRIMARY KEY,
    accounts_id0 bigint REFERENCES t00_accounts (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t01_users (accounts_id0);
CREATE TABLE t02_teams (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    accounts_id0 bigint REFERENCES t00_accounts (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t02_teams (accounts_id0);
CREATE TABLE t03_projects (
    id bigserial PRIMARY KEY,
    users_id0 bigint REFERENCES t01_users (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t03_projects (users_id0);
CREATE TABLE t04_tasks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    accounts_id0 bigint REFERENCES t00_accounts (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t04_tasks (accounts_id0);
CREATE TABLE t05_comments (
    id bigserial PRIMARY KEY,
    accounts_id0 bigint REFERENCES t00_accounts (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t05_comments (accounts_id0);
CREATE TABLE t06_labels (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tasks_id0 bigint REFERENCES t04_tasks (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t06_labels (tasks_id0);
CREATE TABLE t07_task_labels (
    id bigserial PRIMARY KEY,
    accounts_id0 bigint REFERENCES t00_accounts (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t07_task_labels (accounts_id0);
CREATE TABLE t08_attachments (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    comments_id0 bigint REFERENCES t05_comments (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t08_attachments (comments_id0);
CREATE TABLE t09_invoices (
    id bigserial PRIMARY KEY,
    accounts_id0 bigint REFERENCES t00_accounts (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t09_invoices (accounts_id0);
CREATE TABLE t10_invoice_lines (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    attachments_id0 bigint REFERENCES t08_attachments (id) ON DELETE CASCADE,
    projects_id1 bigint REFERENCES t03_projects (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t10_invoice_lines (attachments_id0);
CREATE INDEX ON t10_invoice_lines (projects_id1);
CREATE TABLE t11_payments (
    id bigserial PRIMARY KEY,
    accounts_id0 bigint REFERENCES t00_accounts (id) ON DELETE CASCADE,
    users_id1 bigint REFERENCES t01_users (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t11_payments (accounts_id0);
CREATE INDEX ON t11_payments (users_id1);
CREATE TABLE t12_products (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    labels_id0 bigint REFERENCES t06_labels (id) ON DELETE CASCADE,
    labels_id1 bigint REFERENCES t06_labels (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t12_products (labels_id0);
CREATE INDEX ON t12_products (labels_id1);
CREATE TABLE t13_prices (
    id bigserial PRIMARY KEY,
    users_id0 bigint REFERENCES t01_users (id) ON DELETE CASCADE,
    projects_id1 bigint REFERENCES t03_projects (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t13_prices (users_id0);
CREATE INDEX ON t13_prices (projects_id1);
CREATE TABLE t14_orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    users_id0 bigint REFERENCES t01_users (id) ON DELETE CASCADE,
    attachments_id1 bigint REFERENCES t08_attachments (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t14_orders (users_id0);
CREATE INDEX ON t14_orders (attachments_id1);
CREATE TABLE t15_order_lines (
    id bigserial PRIMARY KEY,
    labels_id0 bigint REFERENCES t06_labels (id) ON DELETE CASCADE,
    accounts_id1 bigint REFERENCES t00_accounts (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t15_order_lines (labels_id0);
CREATE INDEX ON t15_order_lines (accounts_id1);
CREATE TABLE t16_shipments (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projects_id0 bigint REFERENCES t03_projects (id) ON DELETE CASCADE,
    task_labels_id1 bigint REFERENCES t07_task_labels (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t16_shipments (projects_id0);
CREATE INDEX ON t16_shipments (task_labels_id1);
CREATE TABLE t17_addresses (
    id bigserial PRIMARY KEY,
    users_id0 bigint REFERENCES t01_users (id) ON DELETE CASCADE,
    products_id1 bigint REFERENCES t12_products (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t17_addresses (users_id0);
CREATE INDEX ON t17_addresses (products_id1);
CREATE TABLE t18_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    users_id0 bigint REFERENCES t01_users (id) ON DELETE CASCADE,
    task_labels_id1 bigint REFERENCES t07_task_labels (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t18_events (users_id0);
CREATE INDEX ON t18_events (task_labels_id1);
CREATE TABLE t19_settings (
    id bigserial PRIMARY KEY,
    users_id0 bigint REFERENCES t01_users (id) ON DELETE CASCADE,
    addresses_id1 bigint REFERENCES t17_addresses (id) ON DELETE CASCADE,
    name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'open', 'done')),
    amount numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
CREATE INDEX ON t19_settings (users_id0);
CREATE INDEX ON t19_settings (addresses_id1);
ALTER TABLE t10_invoice_lines ADD COLUMN accounts_ref bigint REFERENCES t00_accounts (id);
CREATE INDEX ON t10_invoice_lines (accounts_ref);
CREATE INDEX ON t00_accounts (name);
CREATE INDEX ON t00_accounts (status);
CREATE INDEX ON t00_accounts (created_at);
CREATE INDEX ON t01_users (name);
CREATE INDEX ON t01_users (status);
CREATE INDEX ON t01_users (created_at);
CREATE INDEX ON t02_teams (name);
CREATE INDEX ON t02_teams (status);
CREATE INDEX ON t02_teams (created_at);
CREATE INDEX ON t03_projects (name);
CREATE INDEX ON t03_projects (status);
CREATE INDEX ON t03_projects (created_at);
CREATE INDEX ON t04_tasks (name);
CREATE INDEX ON t04_tasks (status);
CREATE INDEX ON t04_tasks (created_at);
CREATE INDEX ON t05_comments (name);
CREATE INDEX ON t05_comments (status);
CREATE INDEX ON t05_comments (created_at);
CREATE INDEX ON t06_labels (name);
CREATE INDEX ON t06_labels (status);
CREATE INDEX ON t06_labels (created_at);
CREATE INDEX ON t07_task_labels (name);
CREATE INDEX ON t07_task_labels (status);
CREATE INDEX ON t07_task_labels (created_at);
CREATE INDEX ON t08_attachments (name);
CREATE INDEX ON t08_attachments (status);
CREATE INDEX ON t08_attachments (created_at);
CREATE INDEX ON t09_invoices (name);
CREATE INDEX ON t09_invoices (status);
CREATE INDEX ON t09_invoices (created_at);

CREATE FUNCTION touch_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.created_at := coalesce(NEW.created_at, now()); RETURN NEW; END $$;
CREATE TRIGGER t04_tasks_touch BEFORE INSERT OR UPDATE ON t04_tasks FOR EACH ROW EXECUTE FUNCTION touch_task();
CREATE VIEW open_tasks AS SELECT id, name, created_at FROM t04_tasks WHERE status = 'open';
INSERT INTO t19_settings (name, status) VALUES ('default', 'open');
