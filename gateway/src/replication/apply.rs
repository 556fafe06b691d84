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

/// A WHERE clause matching `values` on the key columns (or on every sent
/// column, compared as text, with `FULL` identity: json has no `=`).
fn key_match(rel: &Relation, values: &[Value], full: bool) -> String {
    let mut parts = Vec::new();
    for (col, v) in rel.columns.iter().zip(values) {
        if !full && !col.key {
            continue;
        }
        match v {
            Value::Null => parts.push(format!("{} IS NULL", ident(&col.name))),
            Value::Text(t) if full => parts.push(format!("{}::text = {}", ident(&col.name), literal(t))),
            Value::Text(t) => parts.push(format!("{} = {}", ident(&col.name), literal(t))),
            Value::Unchanged => {}
        }
    }
    if parts.is_empty() {
        "false".into()
    } else {
        parts.join(" AND ")
    }
}

/// The statement for one row change, or `None` for messages that are not
/// row changes. `Err` names a change that refers to a relation never described.
pub fn change_sql(relations: &Relations, msg: &Message) -> Result<Option<String>, String> {
    let rel_of = |oid: &u32| relations.get(oid).ok_or_else(|| format!("change for relation {oid} before its description"));
    Ok(Some(match msg {
        Message::Insert { rel, new } => {
            let rel = rel_of(rel)?;
            insert_sql(rel, new)
        }
        Message::Update { rel, old, new } => {
            let rel = rel_of(rel)?;
            let full = full_identity(rel);
            // A key that did not change (no old key sent) is not set again:
            // an identity column GENERATED ALWAYS may only be set to DEFAULT.
            let key_changed = full || old.is_some();
            let sets: Vec<String> = rel
                .columns
                .iter()
                .zip(new)
                .filter(|(c, _)| key_changed || !c.key)
                .filter_map(|(c, v)| value_sql(v).map(|v| format!("{} = {v}", ident(&c.name))))
                .collect();
            if sets.is_empty() {
                return Ok(None);
            }
            let matched = key_match(rel, old.as_deref().unwrap_or(new), full);
            if full {
                format!(
                    "UPDATE {t} SET {} WHERE ctid = (SELECT ctid FROM {t} WHERE {matched} LIMIT 1)",
                    sets.join(", "),
                    t = qualified(rel)
                )
            } else {
                format!("UPDATE {} SET {} WHERE {matched}", qualified(rel), sets.join(", "))
            }
        }
        Message::Delete { rel, old } => {
            let rel = rel_of(rel)?;
            let full = full_identity(rel);
            let matched = key_match(rel, old, full);
            if full {
                format!("DELETE FROM {t} WHERE ctid = (SELECT ctid FROM {t} WHERE {matched} LIMIT 1)", t = qualified(rel))
            } else {
                format!("DELETE FROM {} WHERE {matched}", qualified(rel))
            }
        }
        Message::Truncate { rels, cascade, restart_identity } => {
            let names: Result<Vec<_>, _> = rels.iter().map(|o| rel_of(o).map(qualified)).collect();
            format!(
                "TRUNCATE {}{}{}",
                names?.join(", "),
                if *restart_identity { " RESTART IDENTITY" } else { "" },
                if *cascade { " CASCADE" } else { "" }
            )
        }
        _ => return Ok(None),
    }))
}

fn insert_sql(rel: &Relation, new: &[Value]) -> String {
    let (cols, vals): (Vec<String>, Vec<String>) =
        rel.columns.iter().zip(new).filter_map(|(c, v)| value_sql(v).map(|v| (ident(&c.name), v))).unzip();
    // OVERRIDING SYSTEM VALUE: the source's value of an identity column
    // GENERATED ALWAYS is the one to keep.
    let head = format!("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})", qualified(rel), cols.join(", "), vals.join(", "));
    if full_identity(rel) {
        return head;
    }
    let keys: Vec<String> = rel.columns.iter().filter(|c| c.key).map(|c| ident(&c.name)).collect();
    let updates: Vec<String> = rel.columns.iter().filter(|c| !c.key).map(|c| format!("{n} = EXCLUDED.{n}", n = ident(&c.name))).collect();
    if updates.is_empty() {
        format!("{head} ON CONFLICT ({}) DO NOTHING", keys.join(", "))
    } else {
        format!("{head} ON CONFLICT ({}) DO UPDATE SET {}", keys.join(", "), updates.join(", "))
    }
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
        let sql = change_sql(&items(b'd', true), &Message::Insert { rel: 1, new: vec![text("1"), text("it's")] }).unwrap().unwrap();
        assert_eq!(
            sql,
            r#"INSERT INTO "public"."it""ems" ("id", "note") OVERRIDING SYSTEM VALUE VALUES ('1', 'it''s') ON CONFLICT ("id") DO UPDATE SET "note" = EXCLUDED."note""#
        );
    }

    #[test]
    fn updates_skip_unchanged_toast_and_match_the_old_key() {
        let msg = Message::Update { rel: 1, old: Some(vec![text("1"), Value::Null]), new: vec![text("2"), Value::Unchanged] };
        let sql = change_sql(&items(b'd', true), &msg).unwrap().unwrap();
        assert_eq!(sql, r#"UPDATE "public"."it""ems" SET "id" = '2' WHERE "id" = '1'"#);
        let same_key = Message::Update { rel: 1, old: None, new: vec![text("2"), text("n")] };
        let sql = change_sql(&items(b'd', true), &same_key).unwrap().unwrap();
        assert_eq!(sql, r#"UPDATE "public"."it""ems" SET "note" = 'n' WHERE "id" = '2'"#, "an unchanged key is not set");
    }

    #[test]
    fn full_identity_matches_one_row_on_every_column() {
        let rels = items(b'f', false);
        let sql = change_sql(&rels, &Message::Delete { rel: 1, old: vec![text("1"), Value::Null] }).unwrap().unwrap();
        assert_eq!(
            sql,
            r#"DELETE FROM "public"."it""ems" WHERE ctid = (SELECT ctid FROM "public"."it""ems" WHERE "id"::text = '1' AND "note" IS NULL LIMIT 1)"#
        );
        let ins = change_sql(&rels, &Message::Insert { rel: 1, new: vec![text("1"), Value::Null] }).unwrap().unwrap();
        assert!(!ins.contains("ON CONFLICT"), "{ins}");
    }

    #[test]
    fn a_change_for_an_unknown_relation_is_an_error() {
        assert!(change_sql(&Relations::new(), &Message::Delete { rel: 9, old: vec![] }).is_err());
        let t = Message::Truncate { rels: vec![1], cascade: true, restart_identity: true };
        assert_eq!(change_sql(&items(b'd', true), &t).unwrap().unwrap(), r#"TRUNCATE "public"."it""ems" RESTART IDENTITY CASCADE"#);
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
