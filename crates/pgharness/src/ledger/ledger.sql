-- pgharness' own objects on a test server, one set per role: the ledger (one row per
-- schema), the acquire log (one row per test that asked for a database) and the schema
-- pool's functions, in the schema `__NS__` (`ledger::namespace`: `pgharness_<role>`), owned
-- by that role and granted to nobody. Nothing is shared between roles, so no role can make
-- another's pgharness drop, delete, alter or execute anything: a role only ever reads its
-- own rows, calls its own functions and acts on schemas it owns.
--
-- Installed by `ledger::bootstrap` under an advisory lock, idempotently; the version
-- function is the marker (`ledger::version_probe`): bump it when this file changes
-- incompatibly. Every function runs with `search_path = pg_catalog, pg_temp`, so that a
-- function or operator another role put in a schema of the caller's search_path (public)
-- is never called in its place. No superuser feature is used.

CREATE SCHEMA IF NOT EXISTS __NS__;

CREATE TABLE IF NOT EXISTS __NS__.ledger (
  schema_name text PRIMARY KEY,
  run_id text NOT NULL,
  test_name text NOT NULL,
  attempt integer NOT NULL,
  host text NOT NULL,
  pid integer NOT NULL,
  lock_key integer NOT NULL,
  migrations_hash text NOT NULL,
  status text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  ended_at timestamptz,
  connect_ms double precision,
  create_ms double precision,
  migrate_ms double precision,
  fixtures_ms double precision,
  acquire_ms double precision,
  drop_ms double precision
);
-- Pool columns (added to ledgers of older versions too).
ALTER TABLE __NS__.ledger
  ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT '',
  ADD COLUMN IF NOT EXISTS fresh jsonb,
  ADD COLUMN IF NOT EXISTS uses integer NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS claimed_at timestamptz,
  -- The name the schema had before its last recycle (`finish` renames a recycled schema, so
  -- that a session of the test that ended can never reach the next test's data by name).
  ADD COLUMN IF NOT EXISTS previous_name text;
-- The primary key only: the ledger holds a row per schema (hundreds), so scans are cheap,
-- and a claim's update then touches no other index (every index a test's first statement
-- touches costs it a cold cache entry in its new session).

-- One row per acquire: which path it took (claimed from the pool, or created on a miss),
-- its phase timings, and what became of the schema afterwards. Written by the test's
-- teardown (`finish`), so that a claim touches nothing but the ledger.
CREATE TABLE IF NOT EXISTS __NS__.acquires (
  id text PRIMARY KEY,
  run_id text NOT NULL,
  test_name text NOT NULL,
  schema_name text NOT NULL,
  path text NOT NULL,
  at timestamptz NOT NULL DEFAULT now(),
  connect_ms double precision,
  claim_ms double precision,
  create_ms double precision,
  migrate_ms double precision,
  fixtures_ms double precision,
  acquire_ms double precision,
  outcome text,
  reset_ms double precision
);
CREATE INDEX IF NOT EXISTS acquires_run ON __NS__.acquires (run_id);
-- What a reset or a drop updates: the schema's acquire that has no outcome yet.
CREATE INDEX IF NOT EXISTS acquires_open ON __NS__.acquires (schema_name) WHERE outcome IS NULL;

-- Nothing is granted to anyone: the role's own objects are for the role alone.

-- The structure of a schema, as a hash. Relations are compared by content (leaving out
-- what TRUNCATE, VACUUM, ANALYZE and REFRESH change: relfilenode, statistics, frozen xids,
-- but not whether a materialized view is populated); the schema by its owner and ACL (not
-- its name: `finish` renames a recycled schema); every
-- other catalog by the count and the xmin sum of its rows for the schema: all of a fresh
-- schema's rows are written by the transaction that migrated it, so any later DDL (a row
-- added, replaced or removed) changes the count or raises the sum. Every lookup goes
-- through an index: the schema's objects are found by their pg_depend rows on it.
-- The catalogs hold every pooled schema's objects, so a sequential scan grows with the
-- pool; plpgsql's generic plan does not know the arrays are small: index scans only.
CREATE OR REPLACE FUNCTION __NS__.fingerprint(nsp oid) RETURNS text
LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $fp$
DECLARE
  direct oid[];
  rels oid[];
  procs oid[];
  types oid[];
  members text;
  part text;
  acc text;
BEGIN
  SELECT coalesce(array_agg(objid) FILTER (WHERE classid = 'pg_class'::regclass), '{}'),
         coalesce(array_agg(objid) FILTER (WHERE classid = 'pg_proc'::regclass), '{}'),
         coalesce(array_agg(objid) FILTER (WHERE classid = 'pg_type'::regclass), '{}'),
         count(*) || ':' || coalesce(sum(xmin::text::bigint), 0)
    INTO direct, procs, types, members
    FROM pg_depend WHERE refclassid = 'pg_namespace'::regclass AND refobjid = nsp;
  SELECT direct || coalesce(array_agg(indexrelid), '{}') INTO rels
    FROM pg_index WHERE indrelid = ANY (direct);
  -- One small statement per catalog: each plans in microseconds, where one statement with
  -- twenty subqueries took milliseconds to plan in every new session.
  SELECT string_agg(concat_ws(',', c.oid, c.relname, c.relnamespace, c.relkind, c.relowner,
           c.relacl::text, c.reloptions::text, c.relpersistence, c.relnatts, c.relchecks,
           c.relrowsecurity, c.relforcerowsecurity, c.relreplident, c.relispartition,
           c.reltype, c.relam, c.reloftype, c.relpartbound::text, c.relispopulated), ';' ORDER BY c.oid)
    INTO part FROM pg_class c WHERE c.oid = ANY (rels);
  acc := members || '|' || coalesce(part, '');
  SELECT concat_ws(',', nspowner, nspacl::text) INTO part FROM pg_namespace WHERE oid = nsp;
  acc := acc || '|' || coalesce(part, '');
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_attribute WHERE attrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_attrdef WHERE adrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_constraint WHERE conrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_constraint WHERE contypid = ANY (types);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_index WHERE indrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_trigger WHERE tgrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_rewrite WHERE ev_class = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_sequence WHERE seqrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_policy WHERE polrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_inherits WHERE inhrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_statistic_ext WHERE stxrelid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_proc WHERE oid = ANY (procs);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_type WHERE oid = ANY (types);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_enum WHERE enumtypid = ANY (types);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_description WHERE objoid = ANY (rels || procs || types);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_depend
   WHERE classid = 'pg_class'::regclass AND objid = ANY (rels);
  acc := acc || '|' || part;
  SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) INTO part FROM pg_default_acl WHERE defaclnamespace = nsp;
  RETURN md5(acc || '|' || part);
END
$fp$;

-- The statement `capture` and `reset` run for every sequence's state, built from names
-- with format('%I').
CREATE OR REPLACE FUNCTION __NS__.sequences_query(p_schema text, p_sequences text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $sq$
  SELECT 'SELECT jsonb_agg(jsonb_build_array(n, v, c) ORDER BY n) FROM (' || string_agg(format('SELECT %L AS n, last_value AS v, is_called AS c FROM %I.%I', x, p_schema, x), ' UNION ALL ') || ') s'
    FROM unnest(p_sequences) AS u(x)
$sq$;

-- Row-level security that applies to the schema's owner too (FORCE) would hide rows from
-- `capture` and `reset`: they lift it for their own transaction (other sessions never see
-- it lifted) and `reforce` puts it back. Returns the tables it was lifted on.
CREATE OR REPLACE FUNCTION __NS__.unforce(p_schema text) RETURNS text[]
LANGUAGE plpgsql VOLATILE AS $unf$
DECLARE
  forced text[];
  t text;
BEGIN
  SELECT coalesce(array_agg(c.relname ORDER BY c.relname), '{}') INTO forced
    FROM pg_class c WHERE c.relnamespace = to_regnamespace(quote_ident(p_schema))
     AND c.relkind IN ('r', 'p') AND c.relforcerowsecurity;
  FOREACH t IN ARRAY forced LOOP
    EXECUTE format('ALTER TABLE %I.%I NO FORCE ROW LEVEL SECURITY', p_schema, t);
  END LOOP;
  RETURN forced;
END
$unf$;

CREATE OR REPLACE FUNCTION __NS__.reforce(p_schema text, p_tables text[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $ref$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY p_tables LOOP
    EXECUTE format('ALTER TABLE %I.%I FORCE ROW LEVEL SECURITY', p_schema, t);
  END LOOP;
END
$ref$;

-- Whether some rows of the schema may be hidden from the current role by row-level
-- security it cannot lift: a table with RLS enabled that another role owns (the owner is
-- exempt unless FORCE, which `unforce` lifts), unless the role bypasses RLS.
CREATE OR REPLACE FUNCTION __NS__.rows_hidden(nsp oid) RETURNS boolean
LANGUAGE sql STABLE AS $hid$
  SELECT EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = nsp AND c.relkind IN ('r', 'p')
                   AND c.relrowsecurity
                   AND c.relowner <> (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user))
     AND NOT (SELECT r.rolbypassrls OR r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)
$hid$;

-- The content of a relation as a hash (rows as text, in text order; NULL when empty).
CREATE OR REPLACE FUNCTION __NS__.digest(p_schema text, p_relation text) RETURNS text
LANGUAGE plpgsql STABLE AS $dig$
DECLARE
  digest text;
BEGIN
  EXECUTE format('SELECT md5(string_agg(x::text, E''\n'' ORDER BY x::text)) FROM %I.%I x', p_schema, p_relation) INTO digest;
  RETURN digest;
END
$dig$;

-- Refuses migrations that wrote objects outside the schema they migrate (a `CREATE SCHEMA`,
-- schema-qualified DDL): every test would share them, and pgharness could neither isolate
-- nor reset them. Found by what the current transaction wrote to the catalogs: a namespace
-- of its own (xmin), or an object that depends on a namespace (its pg_depend row's xmin)
-- where the role may create (its own schemas, `public`), outside `p_schema` and the role's
-- pool schemas — looked up through pg_depend's index, not by scanning every pooled schema's
-- relations; extensions' members (`CREATE EXTENSION` objects are shared on purpose) aside.
-- Raises PH002, the foreign schemas' names in its DETAIL (for the caller to find the file).
CREATE OR REPLACE FUNCTION __NS__.refuse_written_elsewhere(p_schema text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $rwe$
DECLARE
  me xid := ((pg_current_xact_id()::text::numeric % 4294967296)::text)::xid;
  nsp oid := to_regnamespace(quote_ident(p_schema));
  found text[];
  schemas text[];
BEGIN
  WITH candidates AS (
    SELECT n.oid, n.nspname FROM pg_namespace n
     WHERE n.oid <> nsp AND n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
       AND has_schema_privilege(n.oid, 'CREATE')
       AND NOT EXISTS (SELECT 1 FROM __NS__.ledger l WHERE l.schema_name = n.nspname)
  ), written AS (
    SELECT 'schema ' || quote_ident(n.nspname) AS what, n.nspname
      FROM pg_namespace n WHERE n.xmin = me AND n.oid <> nsp
    UNION
    SELECT pg_describe_object(d.classid, d.objid, 0), c.nspname
      FROM candidates c
      JOIN pg_depend d ON d.refclassid = 'pg_namespace'::regclass AND d.refobjid = c.oid
     WHERE d.xmin = me
       AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = d.classid
                          AND e.objid = d.objid AND e.deptype = 'e')
  )
  SELECT array_agg(what ORDER BY what), array_agg(DISTINCT nspname) INTO found, schemas FROM written;
  IF found IS NOT NULL THEN
    RAISE EXCEPTION 'the migrations create % outside the test''s schema, where every test would share them and no reset reaches them', array_to_string(found, ', ')
      USING ERRCODE = 'PH002', DETAIL = array_to_string(schemas, ' '),
            HINT = 'create them unqualified, in the schema the migrations run in (its search_path is the test''s schema); objects meant to be shared (another tool''s schema, extensions: the `extensions` setting) belong outside the migrations pgharness runs';
  END IF;
END
$rwe$;

-- Whether the current role owns the schema: pgharness drops, empties and renames only its
-- own schemas, whatever a ledger row says.
CREATE OR REPLACE FUNCTION __NS__.owned(p_schema text) RETURNS boolean
LANGUAGE sql STABLE AS $own$
  SELECT coalesce((SELECT n.nspowner = r.oid FROM pg_namespace n, pg_roles r
                    WHERE n.nspname = p_schema AND r.rolname = current_user), false)
$own$;

-- What a freshly migrated schema looks like, for `reset` to return to: its fingerprint, its
-- tables (children before parents), the tables that hold rows now (seed data from the
-- migrations) with a hash of their content and, up to 1000 rows and 256 kB a table, the rows
-- themselves (for `reset` to put back), every sequence with its state, every materialized
-- view (populated or not, and its rows' hash), and whether row-level security may hide rows
-- from the role (then `reset` cannot prove the schema fresh, and it is never recycled).
-- Every row is seen: FORCE ROW LEVEL SECURITY is lifted for the capture (`unforce`). Names only:
-- `reset` builds its statements from them with format('%I'), and no SQL text is ever kept
-- in the ledger and executed.
CREATE OR REPLACE FUNCTION __NS__.capture(p_schema text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $cap$
DECLARE
  nsp oid := to_regnamespace(quote_ident(p_schema));
  ordered text[] := '{}';
  remaining text[];
  progress boolean;
  t text;
  has_rows boolean;
  seed jsonb := '{}';
  seed_rows jsonb := '{}';
  table_rows jsonb;
  seqs jsonb := '[]';
  digest text;
  seq_names text[];
  forced text[] := __NS__.unforce(p_schema);
  matviews jsonb := '{}';
  m record;
BEGIN
  SELECT coalesce(array_agg(c.relname ORDER BY c.relname), '{}') INTO remaining
    FROM pg_class c WHERE c.relnamespace = nsp AND c.relkind IN ('r', 'p') AND NOT c.relispartition;
  -- Children first: a table goes once no remaining table other than itself references it.
  LOOP
    EXIT WHEN cardinality(remaining) = 0;
    progress := false;
    FOREACH t IN ARRAY remaining LOOP
      IF NOT EXISTS (
        SELECT 1 FROM pg_constraint k
          JOIN pg_class child ON child.oid = k.conrelid
          JOIN pg_class parent ON parent.oid = k.confrelid
         WHERE k.contype = 'f' AND parent.relnamespace = nsp AND parent.relname = t
           AND child.relnamespace = nsp AND child.relname <> t
           AND child.relname = ANY (remaining)) THEN
        ordered := ordered || t;
        remaining := array_remove(remaining, t);
        progress := true;
      END IF;
    END LOOP;
    IF NOT progress THEN
      -- A cycle of foreign keys: keep the rest in name order; `reset` falls back to dropping
      -- the schema if a delete is refused.
      ordered := ordered || remaining;
      EXIT;
    END IF;
  END LOOP;
  FOREACH t IN ARRAY ordered LOOP
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.%I)', p_schema, t) INTO has_rows;
    IF has_rows THEN
      seed := seed || jsonb_build_object(t, __NS__.digest(p_schema, t));
      EXECUTE format('SELECT CASE WHEN count(*) <= 1000 THEN jsonb_agg(to_jsonb(x)) END FROM %I.%I x', p_schema, t)
        INTO table_rows;
      IF table_rows IS NOT NULL AND pg_column_size(table_rows) <= 262144 THEN
        seed_rows := seed_rows || jsonb_build_object(t, table_rows);
      END IF;
    END IF;
  END LOOP;
  SELECT array_agg(c.relname ORDER BY c.relname) INTO seq_names
    FROM pg_class c WHERE c.relnamespace = nsp AND c.relkind = 'S';
  IF seq_names IS NOT NULL THEN
    EXECUTE __NS__.sequences_query(p_schema, seq_names) INTO seqs;
  END IF;
  -- Materialized views: whether each is populated, and its rows' hash when it is.
  FOR m IN SELECT c.relname, c.relispopulated FROM pg_class c
            WHERE c.relnamespace = nsp AND c.relkind = 'm' ORDER BY c.relname LOOP
    matviews := matviews || jsonb_build_object(m.relname, jsonb_build_array(m.relispopulated,
        CASE WHEN m.relispopulated THEN __NS__.digest(p_schema, m.relname) END));
  END LOOP;
  PERFORM __NS__.reforce(p_schema, forced);
  RETURN jsonb_build_object('fingerprint', __NS__.fingerprint(nsp), 'seed', seed,
                            'seed_rows', seed_rows,
                            'sequences', seqs, 'tables', to_jsonb(ordered),
                            'sequence_names', to_jsonb(coalesce(seq_names, '{}')),
                            'matviews', matviews, 'hidden', __NS__.rows_hidden(nsp));
END
$cap$;

-- Returns a schema to the state `capture` recorded: deletes the rows of every table that
-- holds some (children first, again while triggers add rows), puts the seed tables' rows
-- back when a test changed them (all seed tables: deleted children first, inserted parents
-- first, generated columns recomputed, identities as they were), checks that they are as
-- they were, puts materialized views and sequences back, and checks the structure. Returns
-- 'recycled', or why it cannot be: 'changed' (its structure changed), 'seed' (seed rows
-- changed and could not be put back), 'matview' (a materialized view's rows could not be
-- put back), 'hidden' (row-level security the role cannot lift may hide rows), 'busy'
-- (another session still writes in it: an open transaction holds a lock that conflicts with
-- its reset), 'failed' (a delete was refused), 'missing'.
--
-- What it proves rather than assumes: no other session can write while it runs (its tables
-- are locked against writers first, and a writer still in a transaction makes it 'busy');
-- every row is seen (FORCE ROW LEVEL SECURITY is lifted for its transaction); what it
-- cannot put back ends in a drop. A session of the test that is still connected but idle
-- cannot reach the schema afterwards: `finish` renames a recycled schema.
CREATE OR REPLACE FUNCTION __NS__.reset(p_schema text, p_fresh jsonb) RETURNS text
LANGUAGE plpgsql VOLATILE AS $reset$
DECLARE
  nsp oid := to_regnamespace(quote_ident(p_schema));
  t text;
  dirty_tables text[];
  pass integer := 0;
  digest text;
  s jsonb;
  seq_state jsonb;
  probe text;
  seed_changed boolean;
  cols text;
  waits integer;
  lockable text;
  timeout_before text;
  forced text[];
  m record;
  want jsonb;
BEGIN
  IF nsp IS NULL OR p_fresh IS NULL OR p_fresh->'tables' IS NULL
     OR (SELECT n.nspowner FROM pg_namespace n WHERE n.oid = nsp)
        IS DISTINCT FROM (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user) THEN
    RETURN 'missing';
  END IF;
  IF coalesce((p_fresh->>'hidden')::boolean, false) OR __NS__.rows_hidden(nsp) THEN
    RETURN 'hidden';
  END IF;
  -- Which tables hold rows, children first: built from their names with format('%I').
  SELECT 'SELECT array_remove(ARRAY[' || coalesce(string_agg(format('CASE WHEN EXISTS (SELECT 1 FROM %I.%I) THEN %L END', p_schema, x, x), ', ' ORDER BY i), '') || ']::text[], NULL)'
    INTO probe FROM jsonb_array_elements_text(p_fresh->'tables') WITH ORDINALITY AS u(x, i);
  -- No session may write while the reset runs, and none may have written in a transaction
  -- still open (it could commit after the reset): every table is locked against writers,
  -- whatever session holds a conflicting lock (any application_name). Briefly (30 ms)
  -- unless the caller says otherwise (`pgharness.busy_wait_ms`: a teardown nobody waits
  -- for gives the test's process time to exit).
  -- (Tables whose FORCE ROW LEVEL SECURITY `unforce` lifts take the lock that needs.)
  SELECT string_agg(format('LOCK TABLE %I.%I IN %s MODE', p_schema, c.relname,
                           CASE WHEN c.relforcerowsecurity THEN 'ACCESS EXCLUSIVE' ELSE 'EXCLUSIVE' END),
                    '; ' ORDER BY c.relname) INTO lockable
    FROM pg_class c WHERE c.relnamespace = nsp AND c.relkind IN ('r', 'p') AND NOT c.relispartition;
  waits := greatest(1, coalesce(nullif(current_setting('pgharness.busy_wait_ms', true), '')::integer, 30));
  IF lockable IS NOT NULL THEN
    timeout_before := current_setting('lock_timeout');
    PERFORM set_config('lock_timeout', waits || 'ms', true);
    BEGIN
      EXECUTE lockable;
    EXCEPTION WHEN lock_not_available THEN
      PERFORM set_config('lock_timeout', timeout_before, true);
      RETURN 'busy';
    END;
    PERFORM set_config('lock_timeout', timeout_before, true);
  END IF;
  forced := __NS__.unforce(p_schema);
  -- The rows first, the structure last: one fingerprint then covers both what the test
  -- did and anything the deletes' triggers did. A schema whose structure changed is dropped
  -- whatever the deletes did to it (and a delete it refuses ends in a drop too).
  BEGIN
    FOR round IN 1..2 LOOP
      pass := 0;
      LOOP
        pass := pass + 1;
        EXECUTE probe INTO dirty_tables;
        dirty_tables := array(SELECT x FROM unnest(dirty_tables) x WHERE NOT p_fresh->'seed' ? x);
        EXIT WHEN cardinality(dirty_tables) = 0;
        IF pass = 4 THEN
          RETURN 'failed';
        END IF;
        -- The probe lists them children first.
        FOREACH t IN ARRAY dirty_tables LOOP
          EXECUTE format('DELETE FROM %I.%I', p_schema, t);
        END LOOP;
      END LOOP;
      EXIT WHEN round = 2;
      seed_changed := false;
      FOR t IN SELECT jsonb_object_keys(p_fresh->'seed') LOOP
        seed_changed := seed_changed OR __NS__.digest(p_schema, t) IS DISTINCT FROM p_fresh->'seed'->>t;
      END LOOP;
      EXIT WHEN NOT seed_changed;
      -- Every seed table's rows must have been kept to put them back.
      IF EXISTS (SELECT 1 FROM jsonb_object_keys(p_fresh->'seed') k
                  WHERE NOT coalesce(p_fresh->'seed_rows', '{}') ? k) THEN
        RETURN 'seed';
      END IF;
      FOR t IN SELECT x FROM jsonb_array_elements_text(p_fresh->'tables') WITH ORDINALITY AS u(x, i)
                WHERE p_fresh->'seed' ? x ORDER BY i LOOP
        EXECUTE format('DELETE FROM %I.%I', p_schema, t);
      END LOOP;
      FOR t IN SELECT x FROM jsonb_array_elements_text(p_fresh->'tables') WITH ORDINALITY AS u(x, i)
                WHERE p_fresh->'seed' ? x ORDER BY i DESC LOOP
        SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO cols
          FROM pg_attribute a
         WHERE a.attrelid = format('%I.%I', p_schema, t)::regclass
           AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
        EXECUTE format('INSERT INTO %I.%I (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_recordset(NULL::%I.%I, $1) r',
                       p_schema, t, cols, cols, p_schema, t)
          USING p_fresh->'seed_rows'->t;
      END LOOP;
      -- The inserts' triggers may have written elsewhere: the rows again.
    END LOOP;
    -- Seed rows put back are checked against their hashes (unchanged ones were, above).
    IF seed_changed THEN
      FOR t IN SELECT jsonb_object_keys(p_fresh->'seed') LOOP
        IF __NS__.digest(p_schema, t) IS DISTINCT FROM p_fresh->'seed'->>t THEN
          RETURN 'seed';
        END IF;
      END LOOP;
    END IF;
    -- Materialized views, over the tables as they are again: populated ones hold the rows
    -- they held (refreshed when they do not), unpopulated ones are emptied again. One
    -- `capture` did not see is new structure, which the fingerprint finds.
    FOR m IN SELECT c.relname, c.relispopulated FROM pg_class c
              WHERE c.relnamespace = nsp AND c.relkind = 'm' ORDER BY c.relname LOOP
      want := p_fresh->'matviews'->m.relname;
      CONTINUE WHEN want IS NULL;
      IF (want->>0)::boolean THEN
        IF NOT m.relispopulated OR __NS__.digest(p_schema, m.relname) IS DISTINCT FROM want->>1 THEN
          EXECUTE format('REFRESH MATERIALIZED VIEW %I.%I', p_schema, m.relname);
          IF __NS__.digest(p_schema, m.relname) IS DISTINCT FROM want->>1 THEN
            RETURN 'matview';
          END IF;
        END IF;
      ELSIF m.relispopulated THEN
        EXECUTE format('REFRESH MATERIALIZED VIEW %I.%I WITH NO DATA', p_schema, m.relname);
      END IF;
    END LOOP;
    IF jsonb_array_length(p_fresh->'sequence_names') > 0 THEN
      EXECUTE __NS__.sequences_query(p_schema,
          array(SELECT jsonb_array_elements_text(p_fresh->'sequence_names'))) INTO seq_state;
      IF seq_state IS DISTINCT FROM p_fresh->'sequences' THEN
        FOR s IN SELECT jsonb_array_elements(p_fresh->'sequences') LOOP
          PERFORM setval(format('%I.%I', p_schema, s->>0)::regclass, (s->>1)::bigint, (s->>2)::boolean);
        END LOOP;
      END IF;
    END IF;
    PERFORM __NS__.reforce(p_schema, forced);
  EXCEPTION WHEN OTHERS THEN
    RETURN CASE WHEN __NS__.fingerprint(nsp) IS DISTINCT FROM p_fresh->>'fingerprint'
                THEN 'changed' ELSE 'failed' END;
  END;
  IF __NS__.fingerprint(nsp) IS DISTINCT FROM p_fresh->>'fingerprint' THEN
    RETURN 'changed';
  END IF;
  RETURN 'recycled';
END
$reset$;

-- The version marker of this file (`ledger::VERSION_PROBE`): bump it when the file changes
-- in a way older installations lack. A claim is a plain statement built by `ledger.rs`
-- (`claim_sql`): a function would be compiled afresh in every test's new session.
CREATE OR REPLACE FUNCTION __NS__.version_14() RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT 14';

-- Records a schema created (and migrated, in the caller's transaction) for a test on a
-- miss (p_for_test), or for the pool by a warmer (ready at once).
CREATE OR REPLACE FUNCTION __NS__.register(p_schema text, p_hash text, p_source text, p_run text,
    p_test text, p_attempt integer, p_host text, p_pid integer, p_lock_key integer,
    p_for_test boolean, p_connect_ms double precision, p_create_ms double precision,
    p_migrate_ms double precision) RETURNS void
LANGUAGE plpgsql VOLATILE AS $reg$
BEGIN
  INSERT INTO __NS__.ledger (schema_name, run_id, test_name, attempt, host, pid, lock_key,
      migrations_hash, source, status, fresh, uses, claimed_at, ended_at,
      connect_ms, create_ms, migrate_ms)
  VALUES (p_schema, p_run, p_test, p_attempt, p_host, p_pid, p_lock_key, p_hash, p_source,
      CASE WHEN p_for_test THEN 'active' ELSE 'ready' END,
      __NS__.capture(p_schema), CASE WHEN p_for_test THEN 1 ELSE 0 END,
      CASE WHEN p_for_test THEN now() END,
      CASE WHEN NOT p_for_test THEN now() END,
      p_connect_ms, p_create_ms, p_migrate_ms);
END
$reg$;

-- Recycles up to p_limit schemas whose test passed (status passed), whose owner is gone
-- and that nobody else is handling: the janitor's work when there is no janitor (a plain
-- `cargo nextest run`), done by a test's teardown after its own. Also finishes schemas whose
-- teardown never came (status active, its owner's session gone: the owner lock is free):
-- a process killed, or a parting the server never ran. Their acquire is logged with the
-- path 'lost' and the outcome of the recycle. Returns how many.
CREATE OR REPLACE FUNCTION __NS__.sweep(p_limit integer) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $sweep$
DECLARE
  r record;
  done integer := 0;
BEGIN
  FOR r IN SELECT schema_name, lock_key, status, run_id, test_name, claimed_at FROM __NS__.ledger
            WHERE (status = 'passed' AND ended_at < now() - interval '100 milliseconds')
               OR (status = 'active' AND claimed_at < now() - interval '1 second')
            ORDER BY coalesce(ended_at, claimed_at) LIMIT p_limit FOR UPDATE SKIP LOCKED LOOP
    CONTINUE WHEN NOT pg_try_advisory_xact_lock(1885825024, r.lock_key); -- ledger::SCHEMA_LOCK_SPACE
    IF r.status = 'active' THEN
      INSERT INTO __NS__.acquires (id, run_id, test_name, schema_name, path)
      VALUES ('lost:' || r.schema_name || ':' || extract(epoch FROM r.claimed_at), r.run_id,
              r.test_name, r.schema_name, 'lost')
      ON CONFLICT (id) DO NOTHING;
    END IF;
    PERFORM __NS__.finish_detached(r.schema_name, NULL, 'recycle');
    done := done + 1;
  END LOOP;
  RETURN done;
END
$sweep$;

-- Ends a schema's use by a test, and logs the acquire (p_acquire: id, run, test, path,
-- connect_ms, claim_ms, acquire_ms; the session's pgharness.fixtures_ms; create and migrate
-- times from the ledger for a created schema), or NULL for a janitor's recycle. p_mode:
-- 'keep' (renamed to p_keep_name when that is free, status kept), 'pass' (status passed:
-- the janitor recycles it), 'recycle' (reset and back in the pool, or dropped when it
-- cannot be reset). Returns the outcome: 'kept:<name>', 'passed', 'passed:busy',
-- 'recycled', or 'dropped:<reason>'. The caller holds the owner lock.
CREATE OR REPLACE FUNCTION __NS__.finish(p_schema text, p_acquire jsonb, p_mode text, p_keep_name text)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $fin$
DECLARE
  started timestamptz := clock_timestamp();
  fresh_state jsonb;
  result text;
  name text := p_schema;
  elapsed double precision;
  v_acquire_ms double precision := (p_acquire->>'acquire_ms')::double precision;
  renamed text;
BEGIN
  IF p_acquire IS NOT NULL THEN
    INSERT INTO __NS__.acquires (id, run_id, test_name, schema_name, path, connect_ms, claim_ms,
        create_ms, migrate_ms, fixtures_ms, acquire_ms)
    SELECT p_acquire->>'id', p_acquire->>'run', p_acquire->>'test', p_schema, p_acquire->>'path',
           (p_acquire->>'connect_ms')::double precision, (p_acquire->>'claim_ms')::double precision,
           CASE WHEN p_acquire->>'path' = 'created' THEN l.create_ms END,
           CASE WHEN p_acquire->>'path' = 'created' THEN l.migrate_ms END,
           nullif(current_setting('pgharness.fixtures_ms', true), '')::double precision,
           v_acquire_ms
      FROM __NS__.ledger l WHERE l.schema_name = p_schema;
  END IF;
  IF p_mode = 'keep' THEN
    IF p_keep_name IS NOT NULL AND p_keep_name <> p_schema AND __NS__.owned(p_schema) THEN
      BEGIN
        EXECUTE format('ALTER SCHEMA %I RENAME TO %I', p_schema, p_keep_name);
        UPDATE __NS__.ledger SET schema_name = p_keep_name WHERE schema_name = p_schema;
        UPDATE __NS__.acquires SET schema_name = p_keep_name WHERE schema_name = p_schema;
        name := p_keep_name;
      EXCEPTION WHEN OTHERS THEN
        name := p_schema; -- the name is taken: keep the pool's name
      END;
    END IF;
    UPDATE __NS__.ledger SET status = 'kept', ended_at = now(), acquire_ms = v_acquire_ms
     WHERE schema_name = name;
    UPDATE __NS__.acquires SET outcome = 'kept' WHERE schema_name = name AND outcome IS NULL;
    RETURN 'kept:' || name;
  END IF;
  IF p_mode = 'pass' THEN
    UPDATE __NS__.ledger SET status = 'passed', ended_at = now(), acquire_ms = v_acquire_ms
     WHERE schema_name = p_schema;
    RETURN 'passed';
  END IF;
  SELECT fresh INTO fresh_state FROM __NS__.ledger WHERE schema_name = p_schema;
  result := __NS__.reset(p_schema, fresh_state);
  elapsed := 1000 * extract(epoch FROM clock_timestamp() - started);
  IF result = 'busy' THEN
    -- Still in use by a session of its test: whoever comes next (a later teardown's sweep,
    -- the janitor, the reaper) recycles it once that session is gone.
    UPDATE __NS__.ledger SET status = 'passed', ended_at = now()
     WHERE schema_name = p_schema;
    RETURN 'passed:busy';
  END IF;
  IF result = 'recycled' THEN
    -- A new name: a session of the test still connected (an app's pool the test left open)
    -- finds nothing under the old one, so it can never write into the next test's data.
    SELECT 'p_' || left(l.migrations_hash, 12) || '_' || left(replace(gen_random_uuid()::text, '-', ''), 16)
      INTO renamed FROM __NS__.ledger l WHERE l.schema_name = p_schema;
    EXECUTE format('ALTER SCHEMA %I RENAME TO %I', p_schema, renamed);
    UPDATE __NS__.ledger SET status = 'ready', ended_at = now(), schema_name = renamed,
           previous_name = p_schema
     WHERE schema_name = p_schema;
    UPDATE __NS__.acquires SET outcome = 'recycled', reset_ms = elapsed
     WHERE schema_name = p_schema AND outcome IS NULL;
    RETURN 'recycled';
  END IF;
  IF __NS__.owned(p_schema) THEN
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', p_schema);
  END IF;
  UPDATE __NS__.ledger SET status = 'dropped', ended_at = now(),
         drop_ms = 1000 * extract(epoch FROM clock_timestamp() - started)
   WHERE schema_name = p_schema;
  UPDATE __NS__.acquires SET outcome = 'dropped:' || result,
         reset_ms = 1000 * extract(epoch FROM clock_timestamp() - started)
   WHERE schema_name = p_schema AND outcome IS NULL;
  RETURN 'dropped:' || result;
END
$fin$;

-- `finish` for a teardown nobody waits for (`parting.rs`), and for a sweep: its errors are
-- caught, recorded as the acquire's outcome (`failed: <SQLSTATE> <message>`, which the run
-- summary names), and the schema is left `passed` for a later sweep, the janitor or the
-- reaper to retry.
CREATE OR REPLACE FUNCTION __NS__.finish_detached(p_schema text, p_acquire jsonb, p_mode text)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $fd$
BEGIN
  RETURN __NS__.finish(p_schema, p_acquire, p_mode, NULL);
EXCEPTION WHEN OTHERS THEN
  IF p_acquire IS NOT NULL THEN
    INSERT INTO __NS__.acquires (id, run_id, test_name, schema_name, path, connect_ms, claim_ms,
        acquire_ms, outcome)
    VALUES (p_acquire->>'id', p_acquire->>'run', p_acquire->>'test', p_schema, p_acquire->>'path',
        (p_acquire->>'connect_ms')::double precision, (p_acquire->>'claim_ms')::double precision,
        (p_acquire->>'acquire_ms')::double precision, 'failed: ' || SQLSTATE || ' ' || SQLERRM)
    ON CONFLICT (id) DO UPDATE SET outcome = EXCLUDED.outcome;
  END IF;
  UPDATE __NS__.ledger SET status = 'passed', ended_at = now()
   WHERE schema_name = p_schema AND status = 'active';
  RETURN 'failed';
END
$fd$;

-- Drops a ready schema of the pool, unless a claimant has it locked this instant. True when
-- it dropped it.
CREATE OR REPLACE FUNCTION __NS__.discard(p_schema text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $dis$
DECLARE
  started timestamptz := clock_timestamp();
BEGIN
  PERFORM 1 FROM __NS__.ledger WHERE schema_name = p_schema AND status = 'ready'
    FOR UPDATE SKIP LOCKED;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  IF __NS__.owned(p_schema) THEN
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', p_schema);
  END IF;
  UPDATE __NS__.ledger SET status = 'dropped', ended_at = now(),
         drop_ms = 1000 * extract(epoch FROM clock_timestamp() - started)
   WHERE schema_name = p_schema;
  RETURN true;
END
$dis$;

-- Drops a schema if the role owns it (a teardown's or the reaper's drop).
CREATE OR REPLACE FUNCTION __NS__.discard_owned(p_schema text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $do$
BEGIN
  IF NOT __NS__.owned(p_schema) THEN
    RETURN false;
  END IF;
  EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', p_schema);
  RETURN true;
END
$do$;

-- A miss where the caller cannot take one (fixtures follow the claim in its round trip).
CREATE OR REPLACE FUNCTION __NS__.miss() RETURNS text
LANGUAGE plpgsql VOLATILE AS $miss$
BEGIN
  RAISE EXCEPTION 'no ready schema in the pool' USING ERRCODE = 'PH001';
END
$miss$;

-- Ready schemas of the pool, per migration set (for the warmer and the summary).
CREATE OR REPLACE FUNCTION __NS__.ready_count(p_hash text) RETURNS bigint
LANGUAGE sql STABLE AS $rc$
  SELECT count(*) FROM __NS__.ledger WHERE status = 'ready' AND migrations_hash = p_hash
$rc$;

-- Every function resolves names in pg_catalog only (tables are qualified): see the top.
DO $sp$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = '__NS__'::regnamespace LOOP
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
  END LOOP;
  -- What they hash and keep is rows as text: the same text whatever the calling session's
  -- settings (an sqlx session's TimeZone=UTC, a server's own time zone).
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = '__NS__'::regnamespace
              AND p.proname IN ('capture', 'reset', 'digest', 'finish', 'finish_detached', 'sweep') LOOP
    EXECUTE format('ALTER FUNCTION %s SET TimeZone = ''UTC'' SET DateStyle = ''ISO, YMD'' '
                   'SET IntervalStyle = ''postgres'' SET extra_float_digits = 1 '
                   'SET bytea_output = ''hex'' SET lc_monetary = ''C''', f);
  END LOOP;
END
$sp$;
