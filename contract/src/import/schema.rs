//! The target: Omni's eight tables as `migrations/0002_omni_schema.sql`
//! creates them, described once for the importer (columns, types, defaults,
//! keys, and the references between tables).
//!
//! The migration is the schema; this is what the importer must know about it
//! to turn SQLite values into PostgreSQL ones without asking the database for
//! every row. A test in `tests/tests/import_sqlite.rs` compares the two.

/// How a column's values are encoded for PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `integer`
    Int,
    /// `varchar` or `text`
    Text,
    /// `boolean`
    Bool,
    /// `timestamp` (without time zone, UTC)
    Timestamp,
}

/// A column's default, used when the file has the column but a row holds
/// NULL where the target forbids it (PostgreSQL applies defaults only to
/// columns left out, not to explicit NULLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    None,
    Text(&'static str),
    Bool(bool),
    Int(i32),
    /// `now()`: the time the import started.
    Now,
}

#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
    pub not_null: bool,
    pub default: Default,
    /// `varchar(n)`: at most this many characters.
    pub max_chars: Option<usize>,
    /// A CHECK (… IN (…)) constraint.
    pub allowed: Option<&'static [&'static str]>,
}

/// What PostgreSQL does to a row when the row it references is deleted,
/// which is also what the importer does when that row is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    /// The row goes: an orphan is skipped.
    Cascade,
    /// The row stays without its reference: the column is cleared.
    SetNull,
}

#[derive(Debug, Clone, Copy)]
pub struct Reference {
    pub column: &'static str,
    /// Index into [`TABLES`] of the referenced table.
    pub parent: usize,
    pub parent_column: &'static str,
    pub on_delete: OnDelete,
}

#[derive(Debug)]
pub struct Table {
    /// Name in PostgreSQL, and in the prefixed era's SQLite files.
    pub name: &'static str,
    /// Name in the older SQLite files (no `omni_` prefix).
    pub old_name: &'static str,
    pub columns: &'static [Column],
    /// The primary key column.
    pub key: &'static str,
    /// Whether the key is an integer identity whose sequence must be moved
    /// past the largest imported id.
    pub identity: bool,
    pub references: &'static [Reference],
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

const fn col(name: &'static str, kind: Kind) -> Column {
    Column { name, kind, not_null: false, default: Default::None, max_chars: None, allowed: None }
}

const fn req(name: &'static str, kind: Kind) -> Column {
    Column { name, kind, not_null: true, default: Default::None, max_chars: None, allowed: None }
}

const fn def(name: &'static str, kind: Kind, default: Default) -> Column {
    Column { name, kind, not_null: false, default, max_chars: None, allowed: None }
}

const fn req_def(name: &'static str, kind: Kind, default: Default) -> Column {
    Column { name, kind, not_null: true, default, max_chars: None, allowed: None }
}

use Kind::{Bool, Int, Text, Timestamp as Ts};

pub const GLOBAL_SETTINGS: usize = 0;
pub const SETTING_CHANGE_HISTORY: usize = 1;
pub const INSTANCE_CONFIGS: usize = 2;
pub const USERS: usize = 3;
pub const USER_EXTERNAL_IDS: usize = 4;
pub const ACCESS_RULES: usize = 5;
pub const MESSAGE_TRACES: usize = 6;
pub const TRACE_PAYLOADS: usize = 7;

/// Every table, parents before children: the order rows are imported in.
pub const TABLES: [Table; 8] = [
    Table {
        name: "omni_global_settings",
        old_name: "global_settings",
        columns: &[
            req("id", Int),
            req("key", Text),
            col("value", Text),
            Column { max_chars: Some(20), ..req_def("value_type", Text, Default::Text("string")) },
            col("category", Text),
            col("description", Text),
            req_def("is_secret", Bool, Default::Bool(false)),
            req_def("is_required", Bool, Default::Bool(false)),
            col("default_value", Text),
            col("validation_rules", Text),
            req_def("created_at", Ts, Default::Now),
            req_def("updated_at", Ts, Default::Now),
            col("created_by", Text),
            col("updated_by", Text),
        ],
        key: "id",
        identity: true,
        references: &[],
    },
    Table {
        name: "omni_setting_change_history",
        old_name: "setting_change_history",
        columns: &[
            req("id", Int),
            req("setting_id", Int),
            col("old_value", Text),
            col("new_value", Text),
            col("changed_by", Text),
            req_def("changed_at", Ts, Default::Now),
            col("change_reason", Text),
        ],
        key: "id",
        identity: true,
        references: &[Reference { column: "setting_id", parent: GLOBAL_SETTINGS, parent_column: "id", on_delete: OnDelete::Cascade }],
    },
    Table {
        name: "omni_instance_configs",
        old_name: "instance_configs",
        columns: &[
            req("id", Int),
            req("name", Text),
            req_def("channel_type", Text, Default::Text("whatsapp")),
            col("evolution_url", Text),
            col("evolution_key", Text),
            col("whatsapp_instance", Text),
            col("session_id_prefix", Text),
            req_def("webhook_base64", Bool, Default::Bool(true)),
            col("discord_bot_token", Text),
            col("discord_client_id", Text),
            col("discord_guild_id", Text),
            col("discord_default_channel_id", Text),
            def("discord_voice_enabled", Bool, Default::Bool(false)),
            def("discord_slash_commands_enabled", Bool, Default::Bool(true)),
            col("discord_webhook_url", Text),
            col("discord_permissions", Int),
            def("agent_instance_type", Text, Default::Text("automagik")),
            col("agent_api_url", Text),
            col("agent_api_key", Text),
            def("agent_id", Text, Default::Text("default")),
            req_def("agent_type", Text, Default::Text("agent")),
            def("agent_timeout", Int, Default::Int(60)),
            req_def("agent_stream_mode", Bool, Default::Bool(false)),
            col("default_agent", Text),
            col("automagik_instance_id", Text),
            col("automagik_instance_name", Text),
            col("profile_name", Text),
            col("profile_pic_url", Text),
            col("owner_jid", Text),
            def("is_default", Bool, Default::Bool(false)),
            def("is_active", Bool, Default::Bool(false)),
            req_def("enable_auto_split", Bool, Default::Bool(true)),
            def("created_at", Ts, Default::Now),
            def("updated_at", Ts, Default::Now),
        ],
        key: "id",
        identity: true,
        references: &[],
    },
    Table {
        name: "omni_users",
        old_name: "users",
        columns: &[
            req("id", Text),
            req("phone_number", Text),
            req("whatsapp_jid", Text),
            req("instance_name", Text),
            col("display_name", Text),
            col("last_session_name_interaction", Text),
            col("last_agent_user_id", Text),
            def("last_seen_at", Ts, Default::Now),
            def("message_count", Int, Default::Int(0)),
            def("created_at", Ts, Default::Now),
            def("updated_at", Ts, Default::Now),
        ],
        key: "id",
        identity: false,
        references: &[Reference { column: "instance_name", parent: INSTANCE_CONFIGS, parent_column: "name", on_delete: OnDelete::Cascade }],
    },
    Table {
        name: "omni_user_external_ids",
        old_name: "user_external_ids",
        columns: &[
            req("id", Int),
            req("user_id", Text),
            req("provider", Text),
            req("external_id", Text),
            col("instance_name", Text),
            req_def("created_at", Ts, Default::Now),
            req_def("updated_at", Ts, Default::Now),
        ],
        key: "id",
        identity: true,
        references: &[
            Reference { column: "user_id", parent: USERS, parent_column: "id", on_delete: OnDelete::Cascade },
            Reference { column: "instance_name", parent: INSTANCE_CONFIGS, parent_column: "name", on_delete: OnDelete::SetNull },
        ],
    },
    Table {
        name: "omni_access_rules",
        old_name: "access_rules",
        columns: &[
            req("id", Int),
            col("instance_name", Text),
            req("phone_number", Text),
            Column { max_chars: Some(10), allowed: Some(&["allow", "block"]), ..req("rule_type", Text) },
            req_def("created_at", Ts, Default::Now),
            req_def("updated_at", Ts, Default::Now),
        ],
        key: "id",
        identity: true,
        references: &[Reference { column: "instance_name", parent: INSTANCE_CONFIGS, parent_column: "name", on_delete: OnDelete::Cascade }],
    },
    Table {
        name: "omni_message_traces",
        old_name: "message_traces",
        columns: &[
            req("trace_id", Text),
            col("instance_name", Text),
            col("whatsapp_message_id", Text),
            col("sender_phone", Text),
            col("sender_name", Text),
            col("sender_jid", Text),
            col("message_type", Text),
            def("has_media", Bool, Default::Bool(false)),
            def("has_quoted_message", Bool, Default::Bool(false)),
            col("message_length", Int),
            col("session_name", Text),
            col("agent_session_id", Text),
            def("received_at", Ts, Default::Now),
            col("processing_started_at", Ts),
            col("agent_request_at", Ts),
            col("agent_response_at", Ts),
            col("evolution_send_at", Ts),
            col("completed_at", Ts),
            def("status", Text, Default::Text("received")),
            col("error_message", Text),
            col("error_stage", Text),
            def("blocked_by_access_rule", Bool, Default::Bool(false)),
            col("access_rule_id", Int),
            col("blocking_reason", Text),
            col("agent_processing_time_ms", Int),
            col("total_processing_time_ms", Int),
            col("agent_request_tokens", Int),
            col("agent_response_tokens", Int),
            col("agent_response_success", Bool),
            col("agent_response_length", Int),
            def("agent_tools_used", Int, Default::Int(0)),
            col("evolution_response_code", Int),
            col("evolution_success", Bool),
        ],
        key: "trace_id",
        identity: false,
        references: &[
            Reference { column: "instance_name", parent: INSTANCE_CONFIGS, parent_column: "name", on_delete: OnDelete::SetNull },
            Reference { column: "access_rule_id", parent: ACCESS_RULES, parent_column: "id", on_delete: OnDelete::SetNull },
        ],
    },
    Table {
        name: "omni_trace_payloads",
        old_name: "trace_payloads",
        columns: &[
            req("id", Int),
            col("trace_id", Text),
            col("stage", Text),
            col("payload_type", Text),
            col("payload_compressed", Text),
            col("payload_size_original", Int),
            col("payload_size_compressed", Int),
            def("timestamp", Ts, Default::Now),
            col("status_code", Int),
            col("error_details", Text),
            def("contains_media", Bool, Default::Bool(false)),
            def("contains_base64", Bool, Default::Bool(false)),
        ],
        key: "id",
        identity: true,
        references: &[Reference { column: "trace_id", parent: MESSAGE_TRACES, parent_column: "trace_id", on_delete: OnDelete::Cascade }],
    },
];

/// PostgreSQL's quoting of an identifier (all ours are plain, but SQLite
/// column names come from the file).
pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_before_children_and_references_name_real_columns() {
        for (i, table) in TABLES.iter().enumerate() {
            assert!(table.column(table.key).is_some_and(|c| c.not_null), "{}: key", table.name);
            for r in table.references {
                assert!(r.parent < i, "{} references a later table", table.name);
                assert!(table.column(r.column).is_some(), "{}.{}", table.name, r.column);
                assert!(TABLES[r.parent].column(r.parent_column).is_some(), "{} → {}", table.name, r.parent_column);
            }
        }
    }
}
