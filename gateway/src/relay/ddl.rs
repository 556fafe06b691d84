//! Which SQL replays one captured DDL command on the target.
//!
//! PostgreSQL has no deparser in core, and the source's event trigger only
//! sees the client's whole query string (`current_query()`), which may hold
//! several statements, transaction control, comments, DML, or a `DO` block
//! around the DDL. So the capture sends, per command that ended, its command
//! tag, how many commands with that tag the same query string ended before
//! it, the query string, and — for a command run from inside a function or
//! `DO` block — the statement PL/pgSQL executed (from its error context) and
//! a statement rebuilt from the catalogs. Here the relay picks exactly that
//! command's text with a real lexer.
//!
//! The choice runs here rather than in the trigger: a lexer in PL/pgSQL
//! would run in every DDL transaction of the application, be as long as
//! this one, and only be testable against a server; here it is a pure
//! function with unit tests, and a fix reaches old slots' messages too.

use serde::Deserialize;

/// A captured DDL command, as the source's event trigger writes it.
#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct Ddl {
    /// Text to replay as is: a statement the trigger rebuilt from the
    /// catalogs (`CREATE TABLE AS`), or, in messages of older versions, the
    /// whole query string.
    #[serde(default)]
    pub sql: Option<String>,
    pub search_path: String,
    /// `CREATE TABLE … AS`: its rows were decoded before the command ended,
    /// so the table is made right after the transaction's previous DDL,
    /// before those rows.
    #[serde(default)]
    pub before_rows: bool,
    /// The command tag (`ALTER TABLE`).
    #[serde(default)]
    pub tag: Option<String>,
    /// The client's query string the command came from.
    #[serde(default)]
    pub query: Option<String>,
    /// How many commands with the same tag this query string ended before
    /// this one, at top level.
    #[serde(default)]
    pub ordinal: usize,
    /// The command ran inside a function, procedure or `DO` block: the
    /// query string is the call, not the command.
    #[serde(default)]
    pub nested: bool,
    /// PostgreSQL's error context where the command ran (PL/pgSQL shows
    /// the statement it executed).
    #[serde(default)]
    pub context: Option<String>,
    /// The command rebuilt from the catalogs (`CREATE TABLE`, `CREATE
    /// INDEX`), for a nested command whose text the context does not show.
    #[serde(default)]
    pub rebuilt: Option<String>,
    /// What the command made or changed (`public.t`), for messages.
    #[serde(default)]
    pub objects: Vec<String>,
}

/// The statement(s) that replay `ddl`, or why none can.
pub fn command_sql(ddl: &Ddl) -> Result<String, String> {
    let Some(tag) = ddl.tag.as_deref() else {
        // A message of an older version: the whole query string, less
        // transaction control (which would commit the relay's transaction).
        let sql = ddl.sql.as_deref().unwrap_or_default();
        let kept: Vec<String> = split(sql).into_iter().filter(|s| !s.is_transaction_control()).map(|s| replayable(&s)).collect();
        return Ok(kept.join(";\n"));
    };
    if let Some(sql) = &ddl.sql {
        return Ok(sql.trim().to_string());
    }
    let what = || {
        let objects = if ddl.objects.is_empty() { String::new() } else { format!(" ({})", ddl.objects.join(", ")) };
        format!("{tag}{objects}")
    };
    if ddl.nested {
        if let Some(stmt) = ddl.context.as_deref().and_then(executed_statement).and_then(|text| pick(&text, tag, 0)) {
            return Ok(stmt);
        }
        if let Some(rebuilt) = &ddl.rebuilt {
            return Ok(rebuilt.trim().to_string());
        }
        return Err(format!(
            "the DDL command {} ran inside a function or DO block whose text the relay cannot see, and it cannot be rebuilt from the catalogs; \
             run it on the target by hand, or run it as a statement of its own on the source",
            what()
        ));
    }
    let query = ddl.query.as_deref().unwrap_or_default();
    pick(query, tag, ddl.ordinal).ok_or_else(|| {
        format!(
            "the DDL command {} is not among the statements of its query string {:?}; run it on the target by hand, or send it as a statement of its own",
            what(),
            shorten(query)
        )
    })
}

fn shorten(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The `ordinal`-th statement of `sql` with command tag `tag`, ready to replay.
fn pick(sql: &str, tag: &str, ordinal: usize) -> Option<String> {
    split(sql).into_iter().filter(|s| s.tag() == tag).nth(ordinal).map(|s| replayable(&s))
}

/// The text to run inside the relay's transaction: `CONCURRENTLY` cannot
/// run in a transaction block (and the target's index is built by the same
/// transaction that then fills it, so there is nothing to wait for).
fn replayable(s: &Statement) -> String {
    if !matches!(s.tag().as_str(), "CREATE INDEX" | "DROP INDEX") {
        return s.text.to_string();
    }
    match s.tokens.iter().find(|t| t.word.as_deref() == Some("CONCURRENTLY")) {
        Some(t) => format!("{}{}", s.text[..t.start].trim_end(), &s.text[t.end..]),
        None => s.text.to_string(),
    }
}

/// The innermost statement PL/pgSQL (or SPI) executed, from an error
/// context such as:
/// ```text
/// PL/pgSQL function omni_relay.capture_ddl() line 9 at GET DIAGNOSTICS
/// SQL statement "ALTER TABLE t ADD COLUMN c int"
/// PL/pgSQL function inline_code_block line 3 at SQL statement
/// ```
/// The statement is not escaped: it ends at the last `"` before a line
/// that starts another context entry.
fn executed_statement(context: &str) -> Option<String> {
    const HEAD: &str = "\nSQL statement \"";
    let start = context.find(HEAD)? + HEAD.len();
    let rest = &context[start..];
    let entry_starts = ["\nPL/pgSQL function ", "\nSQL function ", "\nSQL statement \"", "\nfunction ", "\nEXECUTE "];
    let end = entry_starts.iter().filter_map(|e| rest.find(&format!("\"{e}"))).min().or_else(|| rest.trim_end().strip_suffix('"').map(str::len))?;
    Some(rest[..end].to_string())
}

/// One token of SQL text: where it is, and its keyword spelling when it is
/// an unquoted word.
#[derive(Debug)]
struct Token {
    start: usize,
    end: usize,
    /// Unquoted identifier or keyword, upper-cased.
    word: Option<String>,
    /// `(` or `)`
    paren: i32,
}

/// One statement of a query string: from its first token to its last, so
/// comments around it (a trailing `-- …`) are not part of it.
#[derive(Debug)]
pub struct Statement<'a> {
    pub text: &'a str,
    tokens: Vec<Token>,
}

impl Statement<'_> {
    fn words(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().map(|t| t.word.as_deref().unwrap_or(""))
    }

    /// PostgreSQL's command tag for the kinds of statement the capture
    /// replays (`CREATE TEMP TABLE` → `CREATE TABLE`); the first words otherwise.
    pub fn tag(&self) -> String {
        let words: Vec<&str> = self.words().take(8).collect();
        let first = words.first().copied().unwrap_or("");
        match first {
            "CREATE" => {
                const MODIFIERS: [&str; 9] = ["OR", "REPLACE", "GLOBAL", "LOCAL", "TEMP", "TEMPORARY", "UNLOGGED", "UNIQUE", "RECURSIVE"];
                let mut rest = words[1..].iter().copied().skip_while(|w| MODIFIERS.contains(w));
                match rest.next().unwrap_or("") {
                    "TABLE" if self.has_top_level_as() => "CREATE TABLE AS".into(),
                    "MATERIALIZED" => "CREATE MATERIALIZED VIEW".into(),
                    kind => format!("CREATE {kind}"),
                }
            }
            "ALTER" | "DROP" => match words.get(1).copied().unwrap_or("") {
                "MATERIALIZED" => format!("{first} MATERIALIZED VIEW"),
                kind => format!("{first} {kind}"),
            },
            "START" => "START TRANSACTION".into(),
            "END" | "ABORT" => "COMMIT".into(),
            other => other.to_string(),
        }
    }

    fn has_top_level_as(&self) -> bool {
        let mut depth = 0;
        self.tokens.iter().any(|t| {
            depth += t.paren;
            depth == 0 && t.word.as_deref() == Some("AS")
        })
    }

    /// `BEGIN`, `COMMIT`, `SAVEPOINT`…: never replayed, the relay's own
    /// transaction is the one that must commit.
    pub fn is_transaction_control(&self) -> bool {
        let tag = self.tag();
        matches!(tag.as_str(), "BEGIN" | "START TRANSACTION" | "COMMIT" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" | "PREPARE" | "SET")
            && (tag != "SET" || self.words().nth(1) == Some("TRANSACTION"))
            && (tag != "PREPARE" || self.words().nth(1) == Some("TRANSACTION"))
    }

}

/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE`: its `BEGIN ATOMIC` body holds `;`.
fn is_routine_definition(tokens: &[Token]) -> bool {
    let words = || tokens.iter().map(|t| t.word.as_deref().unwrap_or(""));
    let mut rest = words().skip(1).skip_while(|w| matches!(*w, "OR" | "REPLACE"));
    words().next() == Some("CREATE") && matches!(rest.next(), Some("FUNCTION" | "PROCEDURE"))
}

/// Splits a query string into its statements the way PostgreSQL's lexer
/// does: `;` inside strings (`'…'`, `E'…'` with backslash escapes, dollar
/// quotes), quoted identifiers, `--` and nested `/* */` comments, and the
/// `BEGIN ATOMIC … END` body of a routine does not end a statement. Empty
/// statements are left out.
pub fn split(sql: &str) -> Vec<Statement<'_>> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut tokens: Vec<Token> = Vec::new();
    // Inside `CREATE FUNCTION … BEGIN ATOMIC`: BEGIN/CASE open, END closes.
    let mut atomic_depth = 0usize;
    let mut i = 0;
    fn push<'a>(sql: &'a str, out: &mut Vec<Statement<'a>>, tokens: &mut Vec<Token>) {
        if let (Some(first), Some(last)) = (tokens.first(), tokens.last()) {
            let text = &sql[first.start..last.end];
            let base = first.start;
            let tokens = std::mem::take(tokens).into_iter().map(|t| Token { start: t.start - base, end: t.end - base, ..t }).collect();
            out.push(Statement { text, tokens });
        }
    }
    while i < b.len() {
        let c = b[i];
        let start = i;
        let mut word = None;
        let mut paren = 0;
        match c {
            _ if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(b.len(), |n| i + n + 1);
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b';' => {
                i += 1;
                if atomic_depth == 0 {
                    push(sql, &mut out, &mut tokens);
                }
                continue;
            }
            b'\'' => i = quoted(b, i, b'\'', false),
            b'"' => i = quoted(b, i, b'"', false),
            b'$' => match dollar_tag(b, i) {
                Some(tag) => {
                    let body = i + tag.len();
                    i = sql[body..].find(tag).map_or(b.len(), |n| body + n + tag.len());
                }
                None => i = i + 1 + b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count(),
            },
            b'(' | b')' => {
                paren = if c == b'(' { 1 } else { -1 };
                i += 1;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                // E'…' (and e'…') takes backslash escapes; U&'…', B'…',
                // X'…', N'…' and U&"…" are quoted like their plain forms.
                let prefix = |p: &str| sql[i..].len() > p.len() && sql[i..i + p.len()].eq_ignore_ascii_case(p);
                if prefix("e'") {
                    i = quoted(b, i + 1, b'\'', true);
                } else if prefix("u&'") || prefix("u&\"") {
                    i = quoted(b, i + 2, b[i + 2], false);
                } else if prefix("b'") || prefix("x'") || prefix("n'") {
                    i = quoted(b, i + 1, b'\'', false);
                } else {
                    i += 1;
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80) {
                        i += 1;
                    }
                    let w = sql[start..i].to_ascii_uppercase();
                    if atomic_depth == 0 && w == "ATOMIC" && tokens.last().and_then(|t| t.word.as_deref()) == Some("BEGIN") {
                        if is_routine_definition(&tokens) {
                            atomic_depth = 1;
                        }
                    } else if atomic_depth > 0 {
                        match w.as_str() {
                            "BEGIN" | "CASE" => atomic_depth += 1,
                            "END" => atomic_depth -= 1,
                            _ => {}
                        }
                    }
                    word = Some(w);
                }
            }
            _ => i += 1,
        }
        tokens.push(Token { start, end: i.min(b.len()), word, paren });
    }
    push(sql, &mut out, &mut tokens);
    out
}

/// The end of a quoted string or identifier starting at `open` (the quote
/// itself): a doubled quote stays inside; with `backslash`, so does `\x`.
fn quoted(b: &[u8], open: usize, quote: u8, backslash: bool) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
        } else if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// `$tag$` (or `$$`) starting at `i`, if that is a dollar quote.
fn dollar_tag(b: &[u8], i: usize) -> Option<&str> {
    let mut j = i + 1;
    if b.get(j).is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    (b.get(j) == Some(&b'$')).then(|| std::str::from_utf8(&b[i..=j]).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<&str> {
        split(sql).into_iter().map(|s| s.text).collect()
    }

    fn top(query: &str, tag: &str, ordinal: usize) -> Result<String, String> {
        command_sql(&Ddl { tag: Some(tag.into()), query: Some(query.into()), ordinal, ..Ddl::default() })
    }

    #[test]
    fn statements_end_at_semicolons_outside_strings_identifiers_comments_and_dollar_quotes() {
        let sql = "ALTER TABLE \"a;b\" ADD COLUMN c text DEFAULT 'x;''y' -- trailing; comment\n;\
                   /* one /* nested; */ still; */ SELECT E'it\\'s;', $f$ ; $f$, $$;$$, $1 ; \
                   CREATE TABLE u&\"d;\" (x int) -- last";
        assert_eq!(
            texts(sql),
            ["ALTER TABLE \"a;b\" ADD COLUMN c text DEFAULT 'x;''y'", "SELECT E'it\\'s;', $f$ ; $f$, $$;$$, $1", "CREATE TABLE u&\"d;\" (x int)"]
        );
        assert!(texts("  -- only a comment\n ; ;").is_empty());
    }

    #[test]
    fn a_routine_body_begin_atomic_is_one_statement() {
        let sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END; ALTER TABLE t ADD c int";
        let s = texts(sql);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1], "ALTER TABLE t ADD c int");
        assert_eq!(texts("BEGIN; ALTER TABLE t ADD c int; COMMIT"), ["BEGIN", "ALTER TABLE t ADD c int", "COMMIT"]);
    }

    #[test]
    fn tags_follow_postgres() {
        let tag = |s: &str| split(s).remove(0).tag();
        assert_eq!(tag("create temp table t (a int)"), "CREATE TABLE");
        assert_eq!(tag("CREATE UNLOGGED TABLE IF NOT EXISTS t (a int)"), "CREATE TABLE");
        assert_eq!(tag("CREATE TABLE t (a, b) AS SELECT 1, 2"), "CREATE TABLE AS");
        assert_eq!(tag("CREATE TABLE t (a int, b text DEFAULT 'AS') PARTITION BY RANGE (a)"), "CREATE TABLE");
        assert_eq!(tag("create unique index concurrently i on t (a)"), "CREATE INDEX");
        assert_eq!(tag("ALTER TABLE t ADD COLUMN a int"), "ALTER TABLE");
        assert_eq!(tag("drop materialized view v"), "DROP MATERIALIZED VIEW");
        for control in ["BEGIN", "begin isolation level serializable", "START TRANSACTION", "COMMIT", "END", "ROLLBACK", "SAVEPOINT a", "SET TRANSACTION READ ONLY"] {
            assert!(split(control).remove(0).is_transaction_control(), "{control}");
        }
        assert!(!split("SET search_path = x").remove(0).is_transaction_control());
    }

    #[test]
    fn the_command_is_picked_from_a_query_string_by_tag_and_ordinal() {
        let q = "BEGIN; ALTER TABLE a ADD x int; INSERT INTO a VALUES (1); CREATE TABLE b (i int); ALTER TABLE b ADD y int -- why\n; COMMIT;";
        assert_eq!(top(q, "ALTER TABLE", 0).unwrap(), "ALTER TABLE a ADD x int");
        assert_eq!(top(q, "ALTER TABLE", 1).unwrap(), "ALTER TABLE b ADD y int");
        assert_eq!(top(q, "CREATE TABLE", 0).unwrap(), "CREATE TABLE b (i int)");
        let err = top(q, "ALTER TABLE", 2).unwrap_err();
        assert!(err.contains("ALTER TABLE") && err.contains("by hand"), "{err}");
    }

    #[test]
    fn concurrently_is_dropped_for_the_relays_transaction() {
        assert_eq!(top("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON t (a) -- x", "CREATE INDEX", 0).unwrap(), "CREATE UNIQUE INDEX IF NOT EXISTS i ON t (a)");
        assert_eq!(top("drop index concurrently i;", "DROP INDEX", 0).unwrap(), "drop index i");
        assert_eq!(top("CREATE INDEX \"concurrently\" ON t (a)", "CREATE INDEX", 0).unwrap(), "CREATE INDEX \"concurrently\" ON t (a)");
    }

    #[test]
    fn a_nested_command_comes_from_the_executed_statement_then_the_catalogs() {
        let context = "PL/pgSQL function omni_relay.capture_ddl() line 9 at GET DIAGNOSTICS\n\
                       SQL statement \"ALTER TABLE b ADD COLUMN \"y\"\"q\" text DEFAULT 'a\"\nb'\"\n\
                       PL/pgSQL function inline_code_block line 1 at EXECUTE";
        let nested = |context: &str, rebuilt: Option<&str>| {
            command_sql(&Ddl {
                tag: Some("ALTER TABLE".into()),
                query: Some("DO $$ BEGIN EXECUTE '…'; END $$".into()),
                nested: true,
                context: Some(context.into()),
                rebuilt: rebuilt.map(Into::into),
                objects: vec!["public.b".into()],
                ..Ddl::default()
            })
        };
        assert_eq!(nested(context, None).unwrap(), "ALTER TABLE b ADD COLUMN \"y\"\"q\" text DEFAULT 'a\"\nb'");
        let sql_function = "PL/pgSQL function omni_relay.capture_ddl() line 9 at GET DIAGNOSTICS\nSQL function \"f\" statement 1";
        assert_eq!(nested(sql_function, Some("CREATE TABLE public.b (x integer)")).unwrap(), "CREATE TABLE public.b (x integer)");
        let err = nested(sql_function, None).unwrap_err();
        assert!(err.contains("ALTER TABLE (public.b)") && err.contains("by hand"), "{err}");
    }

    #[test]
    fn old_messages_replay_their_query_string_without_transaction_control() {
        let old: Ddl = serde_json::from_str(r#"{"sql": "BEGIN; ALTER TABLE t ADD c int; -- x\nCOMMIT", "search_path": "public"}"#).unwrap();
        assert_eq!(command_sql(&old).unwrap(), "ALTER TABLE t ADD c int");
    }
}
