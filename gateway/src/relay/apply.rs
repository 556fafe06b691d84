//! Turning decoded changes into SQL for the target, one source transaction
//! at a time.
//!
//! Values travel as quoted text literals: pgoutput sends each value in its
//! type's text format, and PostgreSQL reads an untyped literal with the
//! column's own input function, so the target needs no knowledge of types
//! and no prepared statements per table shape.
//!
//! Every statement is written so that applying it again, or applying it on
//! top of a newer state of the same row, converges to the source's state
//! (inserts are upserts on the replica identity, updates and deletes match
//! by key and may touch nothing). The initial copy relies on this (see
//! `relay.rs`); during normal streaming each transaction is applied once
//! (the progress table) and the idempotence is only a safety margin.

use std::collections::HashMap;

use super::pgoutput::{Message, Relation, Value};

/// The relation cache one peek builds: pgoutput sends a table's shape
/// before its first change in each decoding session and after it changes.
pub type Relations = HashMap<u32, Relation>;

/// `"schema"."name"` with embedded quotes doubled.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal (standard_conforming_strings is set on the target session).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn qualified(rel: &Relation) -> String {
    format!("{}.{}", ident(&rel.namespace), ident(&rel.name))
}

fn value_sql(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("NULL".into()),
        Value::Text(t) => Some(literal(t)),
        Value::Unchanged => None,
    }
}

/// `FULL` identity (or none): rows are matched on every column, there is no
/// key the target can enforce.
fn full_identity(rel: &Relation) -> bool {
    rel.replica_identity == b'f' || !rel.columns.iter().any(|c| c.key)
}

/// Built-in types without a usable `=` (or whose `=` is not equality, like
/// box and circle comparing areas), and their arrays: matched as text.
const NO_EQUALITY: &[u32] = &[114, 199, 142, 143, 600, 1017, 601, 1018, 602, 1019, 603, 1020, 604, 1027, 628, 629, 718, 719];

/// Whether a `FULL` match compares `type_oid` values by the type's own `=`
/// (the literal read by the column's input function, under the session
/// settings the relay pins on both sides) rather than as text. Types
/// defined in the database (oid ≥ 16384) may lack `=`: text.
fn typed_equality(type_oid: u32) -> bool {
    type_oid < 16_384 && !NO_EQUALITY.contains(&type_oid)
}

/// A WHERE clause matching `values` on the key columns (or, with `FULL`
/// identity, on every sent column: `IS NOT DISTINCT FROM` the literal read
/// as the column's type, as text for types without `=`). `Err` when no
/// value can be matched on: the change cannot be applied, and dropping it
/// silently would leave the target behind.
fn key_match(rel: &Relation, values: &[Value], full: bool) -> Result<String, String> {
    let mut parts = Vec::new();
    for (col, v) in rel.columns.iter().zip(values) {
        if !full && !col.key {
            continue;
        }
        match v {
            Value::Null => parts.push(format!("{} IS NULL", ident(&col.name))),
            Value::Text(t) if full && typed_equality(col.type_oid) => parts.push(format!("{} IS NOT DISTINCT FROM {}", ident(&col.name), literal(t))),
            Value::Text(t) if full => parts.push(format!("{}::text IS NOT DISTINCT FROM {}", ident(&col.name), literal(t))),
            Value::Text(t) => parts.push(format!("{} = {}", ident(&col.name), literal(t))),
            Value::Unchanged => {}
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "a change to {} carries no value of its replica identity to find the row by: it cannot be applied (give the table a primary key or REPLICA IDENTITY FULL)",
            qualified(rel)
        ));
    }
    Ok(parts.join(" AND "))
}

/// One row change as SQL for the target.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A whole statement.
    Sql(String),
    /// `head` + `values` + `tail`: consecutive inserts with the same `head`
    /// and `tail` may share one statement (`values` joined by `, `).
    Insert { head: String, values: String, tail: String },
}

impl Change {
    pub fn into_sql(self) -> String {
        match self {
            Change::Sql(s) => s,
            Change::Insert { head, values, tail } => format!("{head}{values}{tail}"),
        }
    }
}

/// The statement for one row change, or `None` for messages that are not
/// row changes. `Err` names a change that refers to a relation never
/// described, or one that cannot find its row. `strict`: an UPDATE or
/// DELETE of a table without key that matches no row on the target fails
/// (outside the initial copy's window, where it may already be done).
pub fn change(relations: &Relations, msg: &Message, strict: bool) -> Result<Option<Change>, String> {
    let rel_of = |oid: &u32| relations.get(oid).ok_or_else(|| format!("change for relation {oid} before its description"));
    Ok(Some(match msg {
        Message::Insert { rel, new } => {
            let rel = rel_of(rel)?;
            insert(rel, new)
        }
        Message::Update { rel, old, new } => {
            let rel = rel_of(rel)?;
            let full = full_identity(rel);
            // A key that did not change (no old key sent) is not set again:
            // an identity column GENERATED ALWAYS may only be set to DEFAULT.
            // With FULL identity the old row is sent whole: only the
            // columns whose value changed are set, for the same reason.
            let key_changed = full || old.is_some();
            let olds = old.as_deref().filter(|_| full);
            let sets: Vec<String> = rel
                .columns
                .iter()
                .zip(new)
                .enumerate()
                .filter(|(_, (c, _))| key_changed || !c.key)
                .filter(|(i, (_, v))| olds.and_then(|o| o.get(*i)) != Some(*v))
                .filter_map(|(_, (c, v))| value_sql(v).map(|v| format!("{} = {v}", ident(&c.name))))
                .collect();
            if sets.is_empty() {
                return Ok(None);
            }
            let matched = key_match(rel, old.as_deref().unwrap_or(new), full)?;
            if full {
                let sql = format!(
                    "UPDATE {t} SET {} WHERE ctid = (SELECT ctid FROM {t} WHERE {matched} LIMIT 1)",
                    sets.join(", "),
                    t = qualified(rel)
                );
                Change::Sql(if strict { must_match(rel, "update", &sql) } else { sql })
            } else {
                Change::Sql(format!("UPDATE {} SET {} WHERE {matched}", qualified(rel), sets.join(", ")))
            }
        }
        Message::Delete { rel, old } => {
            let rel = rel_of(rel)?;
            let full = full_identity(rel);
            let matched = key_match(rel, old, full)?;
            if full {
                let sql = format!("DELETE FROM {t} WHERE ctid = (SELECT ctid FROM {t} WHERE {matched} LIMIT 1)", t = qualified(rel));
                Change::Sql(if strict { must_match(rel, "delete", &sql) } else { sql })
            } else {
                Change::Sql(format!("DELETE FROM {} WHERE {matched}", qualified(rel)))
            }
        }
        Message::Truncate { rels, cascade, restart_identity } => {
            let names: Result<Vec<_>, _> = rels.iter().map(|o| rel_of(o).map(qualified)).collect();
            Change::Sql(format!(
                "TRUNCATE {}{}{}",
                names?.join(", "),
                if *restart_identity { " RESTART IDENTITY" } else { "" },
                if *cascade { " CASCADE" } else { "" }
            ))
        }
        _ => return Ok(None),
    }))
}

/// [`change`] as one statement.
pub fn change_sql(relations: &Relations, msg: &Message, strict: bool) -> Result<Option<String>, String> {
    Ok(change(relations, msg, strict)?.map(Change::into_sql))
}

/// `sql` (an UPDATE or DELETE of one row) in a block that raises when it
/// touched no row: the target no longer holds the source's old row, and
/// going on would hide the difference.
fn must_match(rel: &Relation, what: &str, sql: &str) -> String {
    let message = format!(
        "the {what} of a row of {} (no primary key: matched on every column) found no such row on the replication target: the target differs from the source",
        qualified(rel)
    );
    let hint = "Re-copy the target: delete this database's row from omni_relay_progress on the target (the relay then copies it anew).";
    let mut tag = "omni_relay".to_string();
    while sql.contains(&format!("${tag}$")) || message.contains(&format!("${tag}$")) {
        tag.push('x');
    }
    format!(
        "DO ${tag}$
#variable_conflict use_column
BEGIN {sql}; IF NOT FOUND THEN RAISE EXCEPTION USING MESSAGE = {}, HINT = {}; END IF; END ${tag}$",
        literal(&message),
        literal(hint)
    )
}

fn insert(rel: &Relation, new: &[Value]) -> Change {
    let (cols, vals): (Vec<String>, Vec<String>) =
        rel.columns.iter().zip(new).filter_map(|(c, v)| value_sql(v).map(|v| (ident(&c.name), v))).unzip();
    // OVERRIDING SYSTEM VALUE: the source's value of an identity column
    // GENERATED ALWAYS is the one to keep.
    let head = format!("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ", qualified(rel), cols.join(", "));
    let values = format!("({})", vals.join(", "));
    if full_identity(rel) {
        return Change::Insert { head, values, tail: String::new() };
    }
    let keys: Vec<String> = rel.columns.iter().filter(|c| c.key).map(|c| ident(&c.name)).collect();
    let updates: Vec<String> = rel.columns.iter().filter(|c| !c.key).map(|c| format!("{n} = EXCLUDED.{n}", n = ident(&c.name))).collect();
    let tail = if updates.is_empty() {
        format!(" ON CONFLICT ({}) DO NOTHING", keys.join(", "))
    } else {
        format!(" ON CONFLICT ({}) DO UPDATE SET {}", keys.join(", "), updates.join(", "))
    };
    Change::Insert { head, values, tail }
}

pub use super::ddl::Ddl;

/// The statements that replay `ddl` on the target: under the search path it
/// ran with on the source, then back to the session's own. Each statement
/// ends on a line of its own, so a comment inside cannot swallow what the
/// relay appends. A command the relay cannot replay stops the relay with a
/// message naming it (the target raises it), rather than letting the target
/// drift from the source unnoticed.
pub fn ddl_sql(ddl: &Ddl) -> String {
    let command = match super::ddl::command_sql(ddl) {
        Ok(sql) if sql.trim().is_empty() => return "SELECT 1".into(),
        Ok(sql) => sql,
        Err(why) => {
            let mut quote = "$omni_relay$".to_string();
            while why.contains(&quote) {
                quote.insert(quote.len() - 1, '_');
            }
            format!("DO {quote} BEGIN RAISE EXCEPTION '%', {}; END {quote}", literal(&why))
        }
    };
    format!("SELECT set_config('search_path', {}, true);\n{command}\n;\nSET LOCAL search_path TO DEFAULT", literal(&ddl.search_path))
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::Column;
    use super::*;

    fn items(identity: u8, key: bool) -> Relations {
        let col = |name: &str, key| Column { key, name: name.into(), type_oid: 25 };
        let rel = Relation { oid: 1, namespace: "public".into(), name: "it\"ems".into(), replica_identity: identity, columns: vec![col("id", key), col("note", false)] };
        HashMap::from([(1, rel)])
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn inserts_become_upserts_on_the_key_and_quote_everything() {
        let sql = change_sql(&items(b'd', true), &Message::Insert { rel: 1, new: vec![text("1"), text("it's")] }, true).unwrap().unwrap();
        assert_eq!(
            sql,
            r#"INSERT INTO "public"."it""ems" ("id", "note") OVERRIDING SYSTEM VALUE VALUES ('1', 'it''s') ON CONFLICT ("id") DO UPDATE SET "note" = EXCLUDED."note""#
        );
    }

    #[test]
    fn updates_skip_unchanged_toast_and_match_the_old_key() {
        let msg = Message::Update { rel: 1, old: Some(vec![text("1"), Value::Null]), new: vec![text("2"), Value::Unchanged] };
        let sql = change_sql(&items(b'd', true), &msg, true).unwrap().unwrap();
        assert_eq!(sql, r#"UPDATE "public"."it""ems" SET "id" = '2' WHERE "id" = '1'"#);
        let same_key = Message::Update { rel: 1, old: None, new: vec![text("2"), text("n")] };
        let sql = change_sql(&items(b'd', true), &same_key, true).unwrap().unwrap();
        assert_eq!(sql, r#"UPDATE "public"."it""ems" SET "note" = 'n' WHERE "id" = '2'"#, "an unchanged key is not set");
    }

    #[test]
    fn full_identity_matches_one_row_on_every_column() {
        let rels = items(b'f', false);
        let delete = Message::Delete { rel: 1, old: vec![text("1"), Value::Null] };
        let sql = change_sql(&rels, &delete, false).unwrap().unwrap();
        assert_eq!(
            sql,
            r#"DELETE FROM "public"."it""ems" WHERE ctid = (SELECT ctid FROM "public"."it""ems" WHERE "id" IS NOT DISTINCT FROM '1' AND "note" IS NULL LIMIT 1)"#
        );
        let strict = change_sql(&rels, &delete, true).unwrap().unwrap();
        assert!(strict.starts_with("DO $omni_relay$") && strict.contains(&sql) && strict.contains("IF NOT FOUND THEN RAISE EXCEPTION"), "{strict}");
        let ins = change_sql(&rels, &Message::Insert { rel: 1, new: vec![text("1"), Value::Null] }, true).unwrap().unwrap();
        assert!(!ins.contains("ON CONFLICT"), "{ins}");
    }

    #[test]
    fn a_change_for_an_unknown_relation_is_an_error() {
        assert!(change_sql(&Relations::new(), &Message::Delete { rel: 9, old: vec![] }, true).is_err());
        let t = Message::Truncate { rels: vec![1], cascade: true, restart_identity: true };
        assert_eq!(change_sql(&items(b'd', true), &t, true).unwrap().unwrap(), r#"TRUNCATE "public"."it""ems" RESTART IDENTITY CASCADE"#);
    }

    #[test]
    fn full_identity_sets_only_changed_columns_and_compares_json_as_text() {
        let mut rels = items(b'f', false);
        rels.get_mut(&1).unwrap().columns[1].type_oid = 114;
        let msg = Message::Update { rel: 1, old: Some(vec![text("1"), text("{}")]), new: vec![text("1"), text("[]")] };
        let sql = change_sql(&rels, &msg, false).unwrap().unwrap();
        assert_eq!(
            sql,
            r#"UPDATE "public"."it""ems" SET "note" = '[]' WHERE ctid = (SELECT ctid FROM "public"."it""ems" WHERE "id" IS NOT DISTINCT FROM '1' AND "note"::text IS NOT DISTINCT FROM '{}' LIMIT 1)"#
        );
        let same = Message::Update { rel: 1, old: Some(vec![text("1"), text("{}")]), new: vec![text("1"), text("{}")] };
        assert_eq!(change_sql(&rels, &same, true).unwrap(), None, "nothing changed, nothing to set");
        let keyless = Message::Delete { rel: 1, old: vec![Value::Unchanged, Value::Unchanged] };
        assert!(change_sql(&rels, &keyless, true).unwrap_err().contains("no value of its replica identity"));
    }

    #[test]
    fn consecutive_inserts_share_head_and_tail() {
        let rels = items(b'd', true);
        let a = change(&rels, &Message::Insert { rel: 1, new: vec![text("1"), text("a")] }, true).unwrap().unwrap();
        let b = change(&rels, &Message::Insert { rel: 1, new: vec![text("2"), Value::Null] }, true).unwrap().unwrap();
        match (a, b) {
            (Change::Insert { head: h1, tail: t1, values: v1 }, Change::Insert { head: h2, tail: t2, values: v2 }) => {
                assert_eq!((h1, t1), (h2, t2));
                assert_eq!((v1.as_str(), v2.as_str()), ("('1', 'a')", "('2', NULL)"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ddl_runs_under_its_source_search_path() {
        let ddl = Ddl {
            tag: Some("ALTER TABLE".into()),
            query: Some("ALTER TABLE t ADD COLUMN c int; -- why".into()),
            search_path: "\"$user\", public".into(),
            ..Ddl::default()
        };
        assert_eq!(
            ddl_sql(&ddl),
            "SELECT set_config('search_path', '\"$user\", public', true);\nALTER TABLE t ADD COLUMN c int\n;\nSET LOCAL search_path TO DEFAULT"
        );
        let lost = Ddl { tag: Some("ALTER TABLE".into()), query: Some("SELECT f()".into()), ..Ddl::default() };
        let sql = ddl_sql(&lost);
        assert!(sql.contains("RAISE EXCEPTION '%', 'the DDL command ALTER TABLE is not among"), "{sql}");
    }
}
