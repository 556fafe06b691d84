//! The embedded cluster's side of the relay: what it needs so its changes
//! can be decoded (publication, DDL capture, replica identities, the slot),
//! and the consistent initial copy.
//!
//! Everything the relay creates in a source database lives in the schema
//! `omni_relay` (excluded from the copy) plus one event trigger, one
//! publication and one slot, all named `omni_relay…`.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use crate::process::child::ChildSpec;
use crate::process::privilege::Account;

use super::apply::literal;
use super::pgoutput::parse_lsn;

/// Publication for all tables: a table created later is in it at once,
/// so its rows travel with the DDL that created it.
pub const PUBLICATION: &str = "omni_relay";
/// Prefix of the logical messages that carry captured DDL.
pub const DDL_PREFIX: &str = "omni_ddl";
/// Prefix of the message a logical backup's restore writes first in its
/// transaction (`omni_contract::backups`): the relay skips that transaction
/// and makes a full copy after it.
pub const RECOPY_PREFIX: &str = "omni_recopy";
/// Prefix of the relay's own keep-alive messages (see `relay.rs`).
pub const HEARTBEAT_PREFIX: &str = "omni_relay_heartbeat";

/// DDL the capture replays on the target: what shapes tables and the types,
/// sequences and indexes they use. Functions, roles, grants, extensions and
/// event triggers are left out: the target's role may not be allowed them,
/// and rows do not depend on them. `CREATE TABLE AS`/`SELECT INTO` are
/// sent as a plain `CREATE TABLE` of the new table's columns: replaying the
/// query would make its rows twice (they are decoded like any insert).
const CAPTURED_TAGS: &str = "'CREATE TABLE','ALTER TABLE','DROP TABLE','CREATE INDEX','ALTER INDEX','DROP INDEX',\
'CREATE SEQUENCE','ALTER SEQUENCE','DROP SEQUENCE','CREATE SCHEMA','ALTER SCHEMA','DROP SCHEMA',\
'CREATE TYPE','ALTER TYPE','DROP TYPE','CREATE DOMAIN','ALTER DOMAIN','DROP DOMAIN'";

/// The capture runs as its owner (the superuser, `SECURITY DEFINER`): DDL
/// by a role that may not emit logical messages is captured all the same.
///
/// Installs (idempotently) the publication, the DDL capture and `REPLICA
/// IDENTITY FULL` on tables without a primary key, which otherwise could not
/// be updated or deleted once published. Committed before the slot is made:
/// see `relay.rs` for why that order closes every gap.
pub async fn prepare(client: &Client) -> Result<()> {
    let wal_level = client.query_one("SHOW wal_level", &[]).await?.get::<_, String>(0);
    if wal_level != "logical" {
        bail!("the embedded PostgreSQL runs with wal_level={wal_level}, but replication needs logical; restart the gateway so it applies");
    }
    let function = format!(
        r#"
-- Which objects the command being dropped removed: a DROP of temporary
-- objects only is not replayed (they never existed on the target).
CREATE OR REPLACE FUNCTION omni_relay.note_drop() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER AS $fn$
BEGIN
    PERFORM set_config('omni_relay.dropped',
        (SELECT CASE WHEN bool_and(is_temporary) THEN 'temporary' ELSE 'kept' END FROM pg_event_trigger_dropped_objects() WHERE original), true);
END
$fn$;
-- Which tables the command rewrote: a rewrite is not decoded, so the rows
-- it computed are sent again (see capture_ddl).
CREATE OR REPLACE FUNCTION omni_relay.note_rewrite() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER AS $fn$
BEGIN
    PERFORM set_config('omni_relay.rewritten',
        coalesce(current_setting('omni_relay.rewritten', true), '') || ' ' || pg_event_trigger_table_rewrite_oid()::text, true);
END
$fn$;
CREATE OR REPLACE FUNCTION omni_relay.capture_ddl() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER AS $fn$
DECLARE
    statement_key text := md5(current_query() || statement_timestamp()::text);
    context text;
    nested boolean;
    seen text;
    counts jsonb := '{{}}';
    ordinal int := 0;
    r record;
    objects text[];
    rebuilt text[];
    created text;
    rewritten text;
BEGIN
    IF coalesce(current_setting('omni_relay.internal', true), '') = 'on' OR tg_tag NOT IN ({CAPTURED_TAGS}, 'CREATE TABLE AS', 'SELECT INTO') THEN
        RETURN;
    END IF;
    IF tg_tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
        FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands() d JOIN pg_class c ON c.oid = d.objid
                 WHERE object_type = 'table' AND c.relpersistence <> 't' LOOP
            SELECT format('CREATE TABLE IF NOT EXISTS %s (%s)', r.objid::regclass,
                          string_agg(format('%I %s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum))
              INTO created FROM pg_attribute WHERE attrelid = r.objid AND attnum > 0 AND NOT attisdropped;
            -- Its rows were written before this trigger ran: the table must
            -- be made before them on the target.
            PERFORM pg_logical_emit_message(true, '{DDL_PREFIX}',
                json_build_object('tag', tg_tag, 'sql', created, 'search_path', current_setting('search_path'), 'before_rows', true)::text);
            PERFORM set_config('omni_relay.internal', 'on', true);
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', r.objid::regclass);
            PERFORM set_config('omni_relay.internal', 'off', true);
        END LOOP;
        RETURN;
    END IF;
    -- The relay picks this command's statement out of the query string by
    -- its tag and how many commands with that tag ended before it (in this
    -- session, so it survives a COMMIT inside the string).
    GET DIAGNOSTICS context = PG_CONTEXT;
    nested := position(E'\n' in context) > 0;
    IF NOT nested THEN
        seen := coalesce(current_setting('omni_relay.seen', true), '');
        IF split_part(seen, ' ', 1) = statement_key THEN
            counts := substr(seen, 34)::jsonb;
        END IF;
        ordinal := coalesce((counts ->> tg_tag)::int, 0);
        PERFORM set_config('omni_relay.seen', statement_key || ' ' || jsonb_set(counts, ARRAY[tg_tag], to_jsonb(ordinal + 1))::text, false);
    END IF;
    -- Temporary objects exist in this session only: never on the target.
    IF tg_tag LIKE 'DROP %' THEN
        IF coalesce(current_setting('omni_relay.dropped', true), '') = 'temporary' THEN
            PERFORM set_config('omni_relay.dropped', '', true);
            RETURN;
        END IF;
        PERFORM set_config('omni_relay.dropped', '', true);
    ELSIF NOT EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() WHERE schema_name IS DISTINCT FROM 'pg_temp') THEN
        IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands()) THEN
            RETURN;
        END IF;
    END IF;
    SELECT array_agg(DISTINCT object_identity) INTO objects FROM pg_event_trigger_ddl_commands() WHERE object_identity IS NOT NULL;
    -- A command inside a function or DO block: the query string is the
    -- call. What the relay cannot read from the context it replays from
    -- the catalogs: the sequences, tables and indexes made.
    IF nested THEN
        FOR r IN SELECT d.command_tag, d.objid, format('%I.%I', n.nspname, c.relname) AS name
                 FROM pg_event_trigger_ddl_commands() WITH ORDINALITY d JOIN pg_class c ON c.oid = d.objid JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE d.command_tag IN ('CREATE SEQUENCE', 'CREATE TABLE', 'CREATE INDEX', 'ALTER SEQUENCE') ORDER BY d.ordinality LOOP
            IF r.command_tag = 'CREATE SEQUENCE' AND NOT EXISTS (SELECT 1 FROM pg_depend WHERE objid = r.objid AND classid = 'pg_class'::regclass AND deptype = 'i') THEN
                rebuilt := rebuilt || (SELECT format('CREATE SEQUENCE %s AS %s INCREMENT %s MINVALUE %s MAXVALUE %s START %s CACHE %s%s', r.name,
                    format_type(seqtypid, NULL), seqincrement, seqmin, seqmax, seqstart, seqcache, CASE WHEN seqcycle THEN ' CYCLE' ELSE '' END)
                    FROM pg_sequence WHERE seqrelid = r.objid);
            ELSIF r.command_tag = 'ALTER SEQUENCE' THEN
                rebuilt := rebuilt || (SELECT format('ALTER SEQUENCE %s OWNED BY %I.%I.%I', r.name, n.nspname, c.relname, a.attname)
                    FROM pg_depend d JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
                    JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = r.objid AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'a');
            ELSIF r.command_tag = 'CREATE TABLE' THEN
                rebuilt := rebuilt || (SELECT format('CREATE TABLE %s (%s)', r.name, string_agg(part, ', ' ORDER BY ord)) FROM (
                    SELECT a.attnum AS ord, format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod))
                        || CASE WHEN a.attcollation <> t.typcollation THEN format(' COLLATE %s', a.attcollation::regcollation) ELSE '' END
                        || CASE a.attidentity WHEN 'a' THEN ' GENERATED ALWAYS AS IDENTITY' WHEN 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' ELSE '' END
                        || CASE WHEN a.attgenerated = 's' THEN format(' GENERATED ALWAYS AS (%s) STORED', pg_get_expr(ad.adbin, ad.adrelid))
                                WHEN ad.adbin IS NOT NULL THEN format(' DEFAULT %s', pg_get_expr(ad.adbin, ad.adrelid)) ELSE '' END
                        || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END AS part
                    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                    LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                    WHERE a.attrelid = r.objid AND a.attnum > 0 AND NOT a.attisdropped
                    UNION ALL
                    SELECT 100000 + row_number() OVER (ORDER BY con.contype DESC, con.conname), format('CONSTRAINT %I %s', con.conname, pg_get_constraintdef(con.oid))
                    FROM pg_constraint con WHERE con.conrelid = r.objid) parts);
            ELSIF r.command_tag = 'CREATE INDEX' AND NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conindid = r.objid AND conrelid <> 0) THEN
                rebuilt := rebuilt || pg_get_indexdef(r.objid);
            END IF;
        END LOOP;
    END IF;
    PERFORM pg_logical_emit_message(true, '{DDL_PREFIX}', json_build_object(
        'tag', tg_tag, 'query', current_query(), 'ordinal', ordinal, 'nested', nested,
        'context', CASE WHEN nested THEN context END, 'rebuilt', array_to_string(rebuilt, E';\n'),
        'objects', coalesce(objects, '{{}}'), 'search_path', current_setting('search_path'))::text);
    -- A table without a primary key could not be updated or deleted once
    -- published: it gets REPLICA IDENTITY FULL (rows matched on every column).
    FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands() WHERE command_tag = 'CREATE TABLE' AND object_type = 'table' AND schema_name <> 'pg_temp' LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = r.objid AND indisprimary) THEN
            PERFORM set_config('omni_relay.internal', 'on', true);
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', r.objid::regclass);
            PERFORM set_config('omni_relay.internal', 'off', true);
        END IF;
    END LOOP;
    -- Values the command computed are not decoded: a rewrite (ADD COLUMN
    -- with a volatile default, ALTER COLUMN TYPE … USING) and a column
    -- added with a default that is not immutable (now(): stored once as the
    -- column's missing value). Replayed on the target they would be the
    -- target's own, so the source sends its rows again here, in the same
    -- transaction, right after the command.
    rewritten := coalesce(current_setting('omni_relay.rewritten', true), '') || ' ';
    PERFORM set_config('omni_relay.rewritten', '', true);
    IF tg_tag = 'ALTER TABLE' THEN
        FOR r IN SELECT DISTINCT d.objid FROM pg_event_trigger_ddl_commands() d JOIN pg_class c ON c.oid = d.objid
                 WHERE d.object_type = 'table' AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p' LOOP
            IF EXISTS (SELECT 1 FROM (SELECT r.objid::regclass AS relid UNION SELECT relid FROM pg_partition_tree(r.objid)) p
                       WHERE position(' ' || p.relid::oid::text || ' ' IN rewritten) > 0)
               OR EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                          WHERE a.attrelid = r.objid AND a.atthasmissing AND age(a.xmin) <= 0
                            AND omni_relay.not_immutable(pg_get_expr(ad.adbin, ad.adrelid))) THEN
                PERFORM omni_relay.resend_rows(r.objid);
            END IF;
        END LOOP;
    END IF;
END
$fn$;
-- Whether a default expression may give another value on another server
-- or at another time: it calls a function that is not immutable, or is
-- one of the SQL value functions. Judged by name, so an immutable function
-- sharing a name with a volatile one counts as volatile (a needless resend).
CREATE OR REPLACE FUNCTION omni_relay.not_immutable(expr text) RETURNS boolean LANGUAGE sql STABLE AS $fn$
    SELECT expr ~* '\m(current_timestamp|current_date|current_time|localtime|localtimestamp|current_user|current_role|session_user|user|current_schema|current_catalog)\M'
        OR EXISTS (SELECT 1 FROM regexp_matches(expr, '([[:alnum:]_]+)\s*\(', 'g') m JOIN pg_proc p ON p.proname = lower(m[1]) WHERE p.provolatile <> 'i')
$fn$;
-- Sends every row of a table again as decoded changes: an UPDATE of one
-- column to itself (the whole new row is sent), or, for a table matched
-- on every column (no key), TRUNCATE and insert again (the target's
-- copy of the rows would not match the source's old values). User
-- triggers do not fire (session_replication_role). A failure here must
-- not fail the application's command: it is reported as a warning.
CREATE OR REPLACE FUNCTION omni_relay.resend_rows(t oid) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    role text := current_setting('session_replication_role');
    col name;
    cols text;
    started timestamptz := clock_timestamp();
BEGIN
    PERFORM set_config('omni_relay.internal', 'on', true);
    PERFORM set_config('session_replication_role', 'replica', true);
    BEGIN
        SELECT attname INTO col FROM pg_attribute
         WHERE attrelid = t AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attidentity <> 'a' ORDER BY attnum LIMIT 1;
        IF col IS NOT NULL AND (SELECT relreplident FROM pg_class WHERE oid = t) <> 'f' THEN
            EXECUTE format('UPDATE %s SET %I = %I', t::regclass, col, col);
        ELSE
            SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO cols FROM pg_attribute
             WHERE attrelid = t AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
            EXECUTE format('CREATE TEMP TABLE omni_relay_resend ON COMMIT DROP AS SELECT %s FROM %s', cols, t::regclass);
            EXECUTE format('TRUNCATE %s', t::regclass);
            EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM omni_relay_resend', t::regclass, cols, cols);
            DROP TABLE omni_relay_resend;
        END IF;
        RAISE LOG 'omni relay: sent the rows of % again after a schema change computed their values (% ms)',
            t::regclass, round(extract(epoch FROM clock_timestamp() - started) * 1000);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'the replica''s rows of % may differ from these: the values this schema change computed could not be sent again (%)', t::regclass, SQLERRM
            USING HINT = 'run UPDATE ' || t::regclass || ' SET <column> = <column> to send them';
    END;
    PERFORM set_config('session_replication_role', role, true);
    PERFORM set_config('omni_relay.internal', 'off', true);
END
$fn$;"#
    );
    let sql = format!(
        "BEGIN;
         SET LOCAL omni_relay.internal = 'on';
         CREATE SCHEMA IF NOT EXISTS omni_relay;
         {function}
         DO $do$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'omni_relay_capture_ddl') THEN
                 CREATE EVENT TRIGGER omni_relay_capture_ddl ON ddl_command_end EXECUTE FUNCTION omni_relay.capture_ddl();
             END IF;
             IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'omni_relay_note_drop') THEN
                 CREATE EVENT TRIGGER omni_relay_note_drop ON sql_drop EXECUTE FUNCTION omni_relay.note_drop();
             END IF;
             IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'omni_relay_note_rewrite') THEN
                 CREATE EVENT TRIGGER omni_relay_note_rewrite ON table_rewrite EXECUTE FUNCTION omni_relay.note_rewrite();
             END IF;
             IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{PUBLICATION}') THEN
                 CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES;
             END IF;
         END $do$;
         DO $do$ DECLARE r record; BEGIN
             FOR r IN SELECT c.oid::regclass AS t FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p') AND c.relreplident = 'd' AND c.relpersistence = 'p'
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'omni_relay') AND n.nspname NOT LIKE 'pg\\_%'
                   AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
             LOOP
                 EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', r.t);
             END LOOP;
         END $do$;
         COMMIT;"
    );
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e).context("installing the publication and DDL capture in the embedded cluster");
    }
    Ok(())
}

/// The slot as the source reports it.
#[derive(Debug, PartialEq)]
pub enum SlotState {
    Missing,
    /// `max_slot_wal_keep_size` was exceeded: WAL it needed is gone.
    Lost,
    Usable,
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<SlotState> {
    let row = client.query_opt("SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
    Ok(match row {
        None => SlotState::Missing,
        Some(r) if r.get::<_, String>(0) == "lost" => SlotState::Lost,
        Some(_) => SlotState::Usable,
    })
}

pub async fn drop_slot(client: &Client, slot: &str) -> Result<()> {
    client
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .context("dropping the old replication slot")?;
    Ok(())
}

/// Creates the slot; its changes start at the returned LSN.
pub async fn create_slot(client: &Client, slot: &str) -> Result<u64> {
    let row = client
        .query_one(&format!("SELECT lsn::text FROM pg_create_logical_replication_slot({}, 'pgoutput')", literal(slot)), &[])
        .await
        .context("creating the replication slot")?;
    parse_lsn(&row.get::<_, String>(0)).context("the slot's LSN")
}

/// How to reach a server with the PostgreSQL client tools, the password in
/// the environment (never on a command line others can read).
#[derive(Clone)]
pub struct ToolTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    /// `PGSSLMODE`/`PGSSLROOTCERT` (the target's; none for the embedded cluster).
    pub tls_env: Vec<(&'static str, String)>,
}

impl ToolTarget {
    pub fn from_config(c: &tokio_postgres::Config) -> Result<ToolTarget> {
        let host = match c.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        Ok(ToolTarget {
            host,
            port: c.get_ports().first().copied().unwrap_or(5432),
            user: c.get_user().context("the URL names no user")?.to_string(),
            password: c.get_password().map(|p| String::from_utf8_lossy(p).into_owned()),
            dbname: c.get_dbname().context("the URL names no database")?.to_string(),
            tls_env: Vec::new(),
        })
    }

    fn apply(&self, mut spec: ChildSpec) -> ChildSpec {
        for inherited in ["PGSERVICE", "PGPASSFILE", "PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGPASSWORD"] {
            spec.env_remove.push(inherited.into());
        }
        spec.env.extend(self.tls_env.iter().map(|(k, v)| ((*k).into(), v.into())));
        spec = spec.env("PGHOST", &self.host).env("PGPORT", self.port.to_string()).env("PGUSER", &self.user).env("PGDATABASE", &self.dbname);
        if let Some(p) = &self.password {
            spec = spec.env("PGPASSWORD", p);
        }
        spec
    }
}

/// pg_restore's table of contents entries the copy keeps: the tables, their
/// rows, keys, indexes, defaults, sequences and the types they use. The
/// `public` schema itself is never dropped or created.
fn keep_toc_line(line: &str) -> bool {
    // "<dumpId>; <catalog oid> <oid> <TYPE…> <schema> <name> <owner>"
    let Some((_, rest)) = line.split_once(';') else { return false };
    let words: Vec<&str> = rest.split_whitespace().skip(2).collect();
    let starts = |kind: &str| {
        let k: Vec<&str> = kind.split(' ').collect();
        words.len() > k.len() && words[..k.len()] == k[..]
    };
    if starts("SCHEMA") {
        // "SCHEMA - <name> <owner>"
        return words.get(2).is_some_and(|name| *name != "public");
    }
    ["TABLE", "SEQUENCE", "DEFAULT", "CONSTRAINT", "FK CONSTRAINT", "INDEX", "TYPE", "DOMAIN"].iter().any(|k| starts(k))
}

/// The initial copy: schema and rows of `source_db` as of the snapshot the
/// caller exported, into the target, as one target transaction
/// (`pg_restore --single-transaction --clean`): a copy that fails leaves the
/// target as it was, and one that is repeated replaces what it made before.
///
/// The tools run as `account` (PostgreSQL's, when the gateway is root, which
/// then owns `work`), through the gateway's child path: they die with the
/// gateway, even on `kill -9`, and a copy abandoned at a stop kills them, so
/// no `pg_restore --clean` of an old copy runs beside the next one.
pub async fn copy(bin_dir: &Path, source: &ToolTarget, snapshot: &str, target: &ToolTarget, work: &Path, account: &Account) -> Result<()> {
    sweep_work_dirs();
    // A directory left by an earlier run (perhaps made by another account) is made afresh.
    match std::fs::remove_dir_all(work) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the earlier copy's {}", work.display())),
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(work).with_context(|| format!("creating {}", work.display()))?;
    // The dump (the whole database) goes with the copy however it ends: done,
    // failed, or abandoned at a stop.
    let _work = WorkDir(work.to_path_buf());
    crate::process::privilege::chown_tree(work, account)?;
    let dump = work.join("copy.dump");
    let list = work.join("copy.list");
    let mut target = target.clone();
    own_root_cert(&mut target, work, account)?;
    let tool = |name: &str| {
        let mut spec = ChildSpec::new(name, bin_dir.join(name));
        spec.run_as = account.run_as();
        spec.env.extend(account.login_env());
        spec.cwd = Some(work.to_path_buf());
        spec
    };
    let spec = tool("pg_dump")
        .arg("--format=custom")
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg("--no-publications")
        .arg("--no-subscriptions")
        .arg("--exclude-schema=omni_relay")
        .arg(format!("--snapshot={snapshot}"))
        .arg("--file")
        .arg(&dump);
    run(source.apply(spec), "pg_dump of the embedded database").await?;

    let toc = run(tool("pg_restore").arg("--list").arg(&dump), "pg_restore --list").await?;
    let kept: String = toc.lines().filter(|l| keep_toc_line(l)).map(|l| format!("{l}\n")).collect();
    std::fs::write(&list, kept).with_context(|| format!("writing {}", list.display()))?;

    let mut spec = tool("pg_restore");
    for a in ["--single-transaction", "--clean", "--if-exists", "--no-owner", "--no-privileges", "--exit-on-error", "--use-list"] {
        spec = spec.arg(a);
    }
    let spec = spec.arg(&list).arg("--dbname").arg(format!("dbname={}", conninfo_quote(&target.dbname))).arg(&dump);
    run(target.apply(spec), "pg_restore into the target").await?;
    Ok(())
}

/// A copy's directory, removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the copy directories of gateways that no longer run (killed
/// with `kill -9` during a copy: their dump of the database stays otherwise).
fn sweep_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("omni-relay-").and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<i32>().ok()) else { continue };
        let gone = matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH));
        if gone && entry.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::info!("removing {}, the copy directory of a gateway that no longer runs", entry.path().display());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The target's `sslrootcert`, when the tools run as another account, copied
/// into the copy's private directory for that account: the file the URL
/// names may be readable by root alone.
fn own_root_cert(target: &mut ToolTarget, work: &Path, account: &Account) -> Result<()> {
    if !account.switch {
        return Ok(());
    }
    for (name, value) in target.tls_env.iter_mut().filter(|(n, v)| *n == "PGSSLROOTCERT" && v != "system") {
        let copy = work.join("root.crt");
        std::fs::copy(&*value, &copy).with_context(|| format!("reading {name}={value}"))?;
        crate::process::privilege::chown_tree(&copy, account)?;
        *value = copy.display().to_string();
    }
    Ok(())
}

fn conninfo_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

async fn run(spec: ChildSpec, what: &str) -> Result<String> {
    let out = crate::process::child::output(spec).await.with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{what} failed ({}): {}", out.status, err.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where a copy's dump is written: private to this gateway and database.
pub fn work_dir(database: &str) -> PathBuf {
    std::env::temp_dir().join(format!("omni-relay-{}-{database}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::keep_toc_line;

    #[test]
    fn the_copy_keeps_tables_rows_keys_and_sequences_but_not_functions_or_public() {
        let keep = [
            "215; 1259 16390 TABLE public items postgres",
            "3340; 0 16390 TABLE DATA public items postgres",
            "216; 1259 16389 SEQUENCE public items_id_seq postgres",
            "3347; 0 0 SEQUENCE OWNED BY public items_id_seq postgres",
            "3348; 0 0 SEQUENCE SET public items_id_seq postgres",
            "3190; 2604 16393 DEFAULT public items id postgres",
            "3192; 2606 16395 CONSTRAINT public items items_pkey postgres",
            "3193; 2606 16397 FK CONSTRAINT public b b_a_fkey postgres",
            "3191; 1259 16396 INDEX public items_note postgres",
            "6; 2615 16384 SCHEMA - app postgres",
        ];
        for l in keep {
            assert!(keep_toc_line(l), "{l}");
        }
        let drop = [
            "5; 2615 2200 SCHEMA - public pg_database_owner",
            "3350; 0 0 COMMENT - SCHEMA public pg_database_owner",
            "218; 1255 16400 FUNCTION public f() postgres",
            "3351; 0 0 ACL - SCHEMA public pg_database_owner",
            ";",
        ];
        for l in drop {
            assert!(!keep_toc_line(l), "{l}");
        }
    }
}
