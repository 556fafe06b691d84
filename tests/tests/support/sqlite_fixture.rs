//! SQLite files as old installations left them (OMNI_SCHEMA.md), built at
//! test time: both naming eras, with every quirk the importer must handle.
//!
//! The rows are few and named so tests can say exactly what each must become:
//! booleans as 0/1 and '0'/'1', datetimes with and without fractions,
//! explicit ids, orphans of every kind, a column of a later revision missing
//! and a column the target does not have.

#![allow(dead_code)]

use std::path::Path;

use rusqlite::{params, Connection};

/// Omni's eight tables, parents first.
pub const TABLES: [&str; 8] = [
    "omni_global_settings",
    "omni_setting_change_history",
    "omni_instance_configs",
    "omni_users",
    "omni_user_external_ids",
    "omni_access_rules",
    "omni_message_traces",
    "omni_trace_payloads",
];

/// A payload as the old product stored it: base64 of zlib-compressed JSON.
pub const PAYLOAD: &str = "eJyrVkrLz1eyUkpKLFKqBQAdegQ0";

/// The older era: tables without the `omni_` prefix, an older revision of
/// `instance_configs` (no `enable_auto_split`, no discord columns, an extra
/// `legacy_webhook_secret`), `users` without `last_agent_user_id`.
pub fn old_era(path: &Path) {
    let db = Connection::open(path).unwrap();
    db.execute_batch(
        r#"
        CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);
        INSERT INTO alembic_version VALUES ('a1b2c3d4e5f6');
        CREATE TABLE instance_configs (
            id INTEGER NOT NULL PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, channel_type VARCHAR DEFAULT 'whatsapp',
            evolution_url VARCHAR, evolution_key VARCHAR, whatsapp_instance VARCHAR, session_id_prefix VARCHAR,
            webhook_base64 BOOLEAN DEFAULT '1', agent_api_url VARCHAR, agent_api_key VARCHAR, default_agent VARCHAR,
            agent_timeout INTEGER, is_default BOOLEAN, is_active BOOLEAN DEFAULT '0',
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP, updated_at DATETIME, legacy_webhook_secret VARCHAR);
        INSERT INTO instance_configs VALUES
            (7, 'main', 'whatsapp', 'http://evolution:8080', 'evo-key', 'main-wa', 'main_', 1, 'http://agent:8000', 'agent-key', 'bot', 30, 1, '1',
             '2024-01-02 03:04:05', '2024-01-02 03:04:05.123456', 'old-secret'),
            (12, 'second', 'discord', NULL, NULL, NULL, NULL, '0', NULL, NULL, NULL, NULL, 0, '0',
             '2024-02-03 04:05:06', NULL, NULL);
        CREATE TABLE users (
            id VARCHAR NOT NULL PRIMARY KEY, phone_number VARCHAR NOT NULL, whatsapp_jid VARCHAR NOT NULL, instance_name VARCHAR NOT NULL,
            display_name VARCHAR, last_session_name_interaction VARCHAR, last_seen_at DATETIME, message_count INTEGER,
            created_at DATETIME, updated_at DATETIME);
        INSERT INTO users VALUES
            ('6f1c2b9e-0000-4000-8000-000000000001', '+15550001', '15550001@s.whatsapp.net', 'main', 'Ada', 'session-a',
             '2024-03-01 10:00:00.5', 42, '2024-01-05 00:00:00', '2024-03-01 10:00:00.5'),
            ('6f1c2b9e-0000-4000-8000-000000000002', '+15550002', '15550002@s.whatsapp.net', 'deleted-instance', 'Orphan', NULL,
             NULL, 1, '2024-01-06 00:00:00', '2024-01-06 00:00:00');
        CREATE TABLE user_external_ids (
            id INTEGER NOT NULL PRIMARY KEY, user_id VARCHAR NOT NULL, provider VARCHAR NOT NULL, external_id VARCHAR NOT NULL,
            instance_name VARCHAR, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL);
        INSERT INTO user_external_ids VALUES
            (3, '6f1c2b9e-0000-4000-8000-000000000001', 'discord', 'd-1', 'main', '2024-01-07 00:00:00', '2024-01-07 00:00:00'),
            (4, '6f1c2b9e-0000-4000-8000-00000000dead', 'discord', 'd-2', NULL, '2024-01-07 00:00:00', '2024-01-07 00:00:00'),
            (5, '6f1c2b9e-0000-4000-8000-000000000001', 'slack', 's-1', 'gone-instance', '2024-01-08 00:00:00.25', '2024-01-08 00:00:00');
        CREATE TABLE access_rules (
            id INTEGER NOT NULL PRIMARY KEY, instance_name VARCHAR, phone_number VARCHAR NOT NULL, rule_type VARCHAR(10) NOT NULL,
            created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL);
        INSERT INTO access_rules VALUES
            (21, NULL, '+15559999', 'block', '2024-01-09 00:00:00', '2024-01-09 00:00:00'),
            (22, 'main', '+15550001', 'allow', '2024-01-09 00:00:00.000001', '2024-01-09 00:00:00'),
            (23, 'gone-instance', '+15550003', 'allow', '2024-01-09 00:00:00', '2024-01-09 00:00:00');
        CREATE TABLE message_traces (
            trace_id VARCHAR NOT NULL PRIMARY KEY, instance_name VARCHAR, whatsapp_message_id VARCHAR, sender_phone VARCHAR,
            sender_name VARCHAR, sender_jid VARCHAR, message_type VARCHAR, has_media BOOLEAN, has_quoted_message BOOLEAN,
            message_length INTEGER, session_name VARCHAR, agent_session_id VARCHAR, received_at DATETIME,
            processing_started_at DATETIME, agent_request_at DATETIME, agent_response_at DATETIME, evolution_send_at DATETIME,
            completed_at DATETIME, status VARCHAR, error_message TEXT, error_stage VARCHAR, blocked_by_access_rule BOOLEAN,
            access_rule_id INTEGER, blocking_reason VARCHAR, agent_processing_time_ms INTEGER, total_processing_time_ms INTEGER,
            agent_request_tokens INTEGER, agent_response_tokens INTEGER, agent_response_success BOOLEAN,
            agent_response_length INTEGER, agent_tools_used INTEGER, evolution_response_code INTEGER, evolution_success BOOLEAN);
        INSERT INTO message_traces VALUES
            ('9a0b0000-0000-4000-8000-000000000001', 'main', 'WAMID.1', '+15550001', 'Ada', '15550001@s.whatsapp.net', 'text', 0, '1',
             11, 'session-a', 'agent-session-1', '2024-03-01 10:00:00', '2024-03-01 10:00:00.100000', '2024-03-01 10:00:00.2',
             '2024-03-01 10:00:01.999999', '2024-03-01 10:00:02', '2024-03-01 10:00:02.5', 'completed', NULL, NULL, '0',
             22, NULL, 1800, 2500, 120, 80, 1, 64, 2, 200, '1'),
            ('9a0b0000-0000-4000-8000-000000000002', 'gone-instance', 'WAMID.2', '+15550003', NULL, NULL, 'image', '1', 0,
             NULL, NULL, NULL, '2024-03-02 11:00:00', NULL, NULL, NULL, NULL, NULL, 'failed', 'agent timed out', 'agent_request', 1,
             23, 'blocked', NULL, NULL, NULL, NULL, 0, NULL, 0, NULL, 0);
        CREATE TABLE trace_payloads (
            id INTEGER NOT NULL PRIMARY KEY, trace_id VARCHAR, stage VARCHAR, payload_type VARCHAR, payload_compressed TEXT,
            payload_size_original INTEGER, payload_size_compressed INTEGER, timestamp DATETIME, status_code INTEGER,
            error_details TEXT, contains_media BOOLEAN, contains_base64 BOOLEAN);
        "#,
    )
    .unwrap();
    db.execute(
        "INSERT INTO trace_payloads VALUES
            (100, '9a0b0000-0000-4000-8000-000000000001', 'webhook_received', 'request', ?1, 120, 28, '2024-03-01 10:00:00.000001', NULL, NULL, 0, '1'),
            (101, '9a0b0000-0000-4000-8000-00000000dead', 'agent_request', 'request', ?1, 120, 28, '2024-03-01 10:00:00', NULL, NULL, 0, 0),
            (140, NULL, 'evolution_send', 'response', ?1, 120, 28, '2024-03-01 10:00:02', 201, 'no trace', '1', 0)",
        params![PAYLOAD],
    )
    .unwrap();
}

/// The prefixed era: `omni_` tables, the settings and their history, and
/// the current revision of every column (plus one the target dropped).
pub fn prefixed_era(path: &Path) {
    let db = Connection::open(path).unwrap();
    db.execute_batch(
        r#"
        CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);
        CREATE TABLE omni_global_settings (
            id INTEGER NOT NULL PRIMARY KEY, key VARCHAR NOT NULL UNIQUE, value VARCHAR, value_type VARCHAR(20) NOT NULL,
            category VARCHAR, description VARCHAR, is_secret BOOLEAN NOT NULL, is_required BOOLEAN NOT NULL,
            default_value VARCHAR, validation_rules VARCHAR, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
            created_by VARCHAR, updated_by VARCHAR);
        INSERT INTO omni_global_settings VALUES
            (1, 'max_message_length', '4096', 'integer', 'limits', 'Longest message sent', 0, '1', '4096', '{"min": 1}',
             '2024-04-01 00:00:00', '2024-04-02 00:00:00.75', 'admin', NULL),
            (5, 'openai_key', 'sk-xyz', 'secret', 'keys', NULL, '1', 0, NULL, NULL, '2024-04-01 00:00:00', '2024-04-01 00:00:00', NULL, NULL);
        CREATE TABLE omni_setting_change_history (
            id INTEGER NOT NULL PRIMARY KEY, setting_id INTEGER NOT NULL, old_value VARCHAR, new_value VARCHAR,
            changed_by VARCHAR, changed_at DATETIME NOT NULL, change_reason VARCHAR);
        INSERT INTO omni_setting_change_history VALUES
            (1, 1, '2048', '4096', 'admin', '2024-04-02 00:00:00.75', 'longer messages'),
            (2, 99, 'a', 'b', 'admin', '2024-04-03 00:00:00', 'its setting was deleted');
        CREATE TABLE omni_instance_configs (
            id INTEGER NOT NULL PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, channel_type VARCHAR NOT NULL, evolution_url VARCHAR,
            evolution_key VARCHAR, whatsapp_instance VARCHAR, session_id_prefix VARCHAR, webhook_base64 BOOLEAN NOT NULL,
            discord_bot_token VARCHAR, discord_client_id VARCHAR, discord_guild_id VARCHAR, discord_default_channel_id VARCHAR,
            discord_voice_enabled BOOLEAN, discord_slash_commands_enabled BOOLEAN, discord_webhook_url VARCHAR,
            discord_permissions INTEGER, agent_instance_type VARCHAR, agent_api_url VARCHAR, agent_api_key VARCHAR,
            agent_id VARCHAR, agent_type VARCHAR NOT NULL, agent_timeout INTEGER, agent_stream_mode BOOLEAN NOT NULL,
            default_agent VARCHAR, automagik_instance_id VARCHAR, automagik_instance_name VARCHAR, profile_name VARCHAR,
            profile_pic_url VARCHAR, owner_jid VARCHAR, is_default BOOLEAN, is_active BOOLEAN, enable_auto_split BOOLEAN NOT NULL,
            created_at DATETIME, updated_at DATETIME, obsolete_column VARCHAR);
        INSERT INTO omni_instance_configs VALUES
            (3, 'discord-bot', 'discord', NULL, NULL, NULL, NULL, '1', 'bot-token', 'client-1', 'guild-1', 'chan-1', '1', '0',
             NULL, 2048, 'hive', 'http://hive', 'hk', 'agent-7', 'team', 90, '1', NULL, NULL, NULL, 'Bot', NULL, NULL, 0, 1, '0',
             '2024-05-01 00:00:00', '2024-05-01 00:00:00.999999', 'x');
        CREATE TABLE omni_users (
            id VARCHAR NOT NULL PRIMARY KEY, phone_number VARCHAR NOT NULL, whatsapp_jid VARCHAR NOT NULL, instance_name VARCHAR NOT NULL,
            display_name VARCHAR, last_session_name_interaction VARCHAR, last_agent_user_id VARCHAR, last_seen_at DATETIME,
            message_count INTEGER, created_at DATETIME, updated_at DATETIME);
        INSERT INTO omni_users VALUES
            ('7e000000-0000-4000-8000-000000000001', '+15557777', 'jid-7', 'discord-bot', NULL, NULL, 'agent-user-9', '2024-05-02 00:00:00', 3,
             '2024-05-02 00:00:00', '2024-05-02 00:00:00');
        CREATE TABLE omni_user_external_ids (
            id INTEGER NOT NULL PRIMARY KEY, user_id VARCHAR NOT NULL, provider VARCHAR NOT NULL, external_id VARCHAR NOT NULL,
            instance_name VARCHAR, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL);
        CREATE TABLE omni_access_rules (
            id INTEGER NOT NULL PRIMARY KEY, instance_name VARCHAR, phone_number VARCHAR NOT NULL, rule_type VARCHAR(10) NOT NULL,
            created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL);
        CREATE TABLE omni_message_traces (trace_id VARCHAR NOT NULL PRIMARY KEY, instance_name VARCHAR, status VARCHAR, received_at DATETIME);
        INSERT INTO omni_message_traces VALUES ('7e0000aa-0000-4000-8000-000000000001', 'discord-bot', NULL, '2024-05-03 00:00:00');
        CREATE TABLE omni_trace_payloads (id INTEGER NOT NULL PRIMARY KEY, trace_id VARCHAR, stage VARCHAR, payload_compressed TEXT);
        "#,
    )
    .unwrap();
}

/// A file of `traces` message traces, each with one payload of about
/// `payload_bytes`, under one instance: for size, speed and crash tests.
pub fn large(path: &Path, traces: u64, payload_bytes: usize) {
    let mut db = Connection::open(path).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
         CREATE TABLE instance_configs (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, channel_type VARCHAR, webhook_base64 BOOLEAN, created_at DATETIME);
         INSERT INTO instance_configs VALUES (1, 'bulk', 'whatsapp', 1, '2024-01-01 00:00:00');
         CREATE TABLE message_traces (trace_id VARCHAR PRIMARY KEY, instance_name VARCHAR, sender_phone VARCHAR, has_media BOOLEAN,
             received_at DATETIME, status VARCHAR, agent_processing_time_ms INTEGER);
         CREATE TABLE trace_payloads (id INTEGER PRIMARY KEY, trace_id VARCHAR, stage VARCHAR, payload_compressed TEXT,
             payload_size_original INTEGER, timestamp DATETIME, contains_base64 BOOLEAN);
         CREATE INDEX trace_payloads_trace_id ON trace_payloads (trace_id);",
    )
    .unwrap();
    let payload: String = PAYLOAD.chars().cycle().take(payload_bytes).collect();
    let tx = db.transaction().unwrap();
    {
        let mut trace = tx.prepare("INSERT INTO message_traces VALUES (?1, 'bulk', ?2, ?3, ?4, 'completed', ?5)").unwrap();
        let mut load = tx.prepare("INSERT INTO trace_payloads VALUES (?1, ?2, 'webhook_received', ?3, 500, ?4, '0')").unwrap();
        for i in 0..traces {
            let id = format!("00000000-0000-4000-8000-{i:012}");
            let at = format!("2024-01-01 {:02}:{:02}:{:02}.{:06}", (i / 3600) % 24, (i / 60) % 60, i % 60, i % 1_000_000);
            trace.execute(params![id, format!("+1555{i:07}"), (i % 2) as i64, at, (i % 5000) as i64]).unwrap();
            load.execute(params![(i + 1) as i64, id, payload, at]).unwrap();
        }
    }
    tx.commit().unwrap();
}

/// The sha256 of a file, hex.
pub fn sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}
