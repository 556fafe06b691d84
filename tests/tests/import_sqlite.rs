//! The SQLite importer through `POST /api/v1/migration/import` (a file named
//! by path): faithful to both naming eras and every quirk of OMNI_SCHEMA.md,
//! idempotent, a dry run that writes nothing, and files that are not
//! databases refused before anything is written. The source is never changed.

use crate::fixture;

use fixture::TABLES;

use std::path::{Path, PathBuf};

use omni_tests::{pg_bin_dir, Response, TempPostgres, Worker, WorkerBuilder};
use serde_json::{json, Value};

/// A worker whose data root (its working directory) has a `data/` directory.
fn worker(pg: &TempPostgres) -> (Worker, PathBuf) {
    let builder = WorkerBuilder::new(&pg.url()).env("PGSERVE_BIN_DIR", pg_bin_dir().display().to_string());
    let root = builder.workdir().to_path_buf();
    std::fs::create_dir_all(root.join("data")).unwrap();
    (builder.start(), root)
}

fn import(worker: &Worker, body: Value) -> Response {
    worker.request("POST", "/api/v1/migration/import").api_key().json(&body).send()
}

fn imported(worker: &Worker, body: Value) -> Value {
    let response = import(worker, body);
    assert_eq!(response.status, 200, "{}\n{}", response.text(), worker.log());
    response.json()
}

/// Every row of every table, as text, sorted: equal snapshots mean nothing changed.
fn snapshot(db: &mut postgres::Client) -> Vec<String> {
    TABLES
        .iter()
        .map(|t| db.query_one(&format!("SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM {t} t"), &[]).unwrap().get(0))
        .collect()
}

fn row(db: &mut postgres::Client, table: &str, condition: &str) -> Value {
    let text: String = db.query_one(&format!("SELECT row_to_json(t)::text FROM {table} t WHERE {condition}"), &[]).unwrap().get(0);
    serde_json::from_str(&text).unwrap()
}

fn table<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tables"].as_array().unwrap().iter().find(|t| t["table"] == name).unwrap_or_else(|| panic!("{name} in {report}"))
}

fn counts(report: &Value, name: &str) -> [u64; 5] {
    let t = table(report, name);
    let skipped = t["skipped"].as_array().unwrap().iter().map(|s| s["rows"].as_u64().unwrap()).sum();
    let n = |field: &str| t[field].as_u64().unwrap();
    [n("rows_in_file"), n("imported"), n("already_present"), n("conflicts"), skipped]
}

/// Backups in the data root's backup directory (their `.sha256` files aside).
fn backups(root: &Path) -> usize {
    let is_backup = |name: &str| name.starts_with("omni_backup_") && name.ends_with(".sql");
    std::fs::read_dir(root.join("data/backups")).map(|d| d.flatten().filter(|e| is_backup(&e.file_name().to_string_lossy())).count()).unwrap_or(0)
}

#[test]
fn imports_the_old_naming_era_faithfully_and_continues_every_sequence() {
    let pg = TempPostgres::start_new();
    let (worker, root) = worker(&pg);
    let file = root.join("data/automagik-omni.db");
    fixture::old_era(&file);
    let hash = fixture::sha256(&file);

    // No path: the file the migration check found.
    let report = imported(&worker, json!({}));
    assert_eq!(report["dry_run"], false);
    assert_eq!(report["source"], file.canonicalize().unwrap().display().to_string());
    assert!(report["safety_backup"].as_str().unwrap().starts_with("omni_backup_"), "{report}");
    assert_eq!(backups(&root), 1, "a safety backup before writing");
    assert_eq!(fixture::sha256(&file), hash, "the source is unchanged");
    assert!(!root.join("data/automagik-omni.db-journal").exists() && !root.join("data/automagik-omni.db-wal").exists());

    // [rows in file, imported, already present, conflicts, skipped]
    assert_eq!(counts(&report, "omni_instance_configs"), [2, 2, 0, 0, 0]);
    assert_eq!(counts(&report, "omni_users"), [2, 1, 0, 0, 1]);
    assert_eq!(counts(&report, "omni_user_external_ids"), [3, 2, 0, 0, 1]);
    assert_eq!(counts(&report, "omni_access_rules"), [3, 2, 0, 0, 1]);
    assert_eq!(counts(&report, "omni_message_traces"), [2, 2, 0, 0, 0]);
    assert_eq!(counts(&report, "omni_trace_payloads"), [3, 2, 0, 0, 1]);
    assert_eq!(counts(&report, "omni_global_settings"), [0, 0, 0, 0, 0]);
    assert_eq!((report["rows_in_file"].as_u64(), report["imported"].as_u64(), report["skipped"].as_u64()), (Some(15), Some(11), Some(4)));
    assert!(report["rows_per_second"].as_u64().unwrap() > 0 && report["duration_ms"].is_u64());

    // Orphans: skipped, counted, named.
    let users = table(&report, "omni_users");
    assert_eq!(users["source_table"], "users");
    let orphan = &users["skipped"][0];
    assert!(orphan["reason"].as_str().unwrap().contains("orphan") && orphan["reason"].as_str().unwrap().contains("omni_instance_configs"), "{orphan}");
    assert!(orphan["examples"][0].as_str().unwrap().contains("6f1c2b9e-0000-4000-8000-000000000002"), "{orphan}");
    assert!(orphan["examples"][0].as_str().unwrap().contains("deleted-instance"), "{orphan}");
    let payloads = table(&report, "omni_trace_payloads");
    assert!(payloads["skipped"][0]["examples"][0].as_str().unwrap().contains("101"), "{payloads}");
    // A reference to a deleted row where the target says ON DELETE SET NULL: kept, reference cleared.
    let traces = table(&report, "omni_message_traces");
    let cleared: Vec<&str> = traces["references_cleared"].as_array().unwrap().iter().map(|c| c["reason"].as_str().unwrap()).collect();
    assert!(cleared.iter().any(|r| r.starts_with("instance_name")) && cleared.iter().any(|r| r.starts_with("access_rule_id")), "{traces}");
    // Columns: the later revision's are defaulted, the ones Omni dropped are reported.
    let instances = table(&report, "omni_instance_configs");
    assert_eq!(instances["columns_dropped"], json!(["legacy_webhook_secret"]));
    assert!(instances["columns_defaulted"].as_array().unwrap().contains(&json!("enable_auto_split")));

    let mut db = pg.client();
    assert_eq!(
        row(&mut db, "omni_instance_configs", "id = 7"),
        json!({"id": 7, "name": "main", "channel_type": "whatsapp", "evolution_url": "http://evolution:8080", "evolution_key": "evo-key",
               "whatsapp_instance": "main-wa", "session_id_prefix": "main_", "webhook_base64": true, "discord_bot_token": null,
               "discord_client_id": null, "discord_guild_id": null, "discord_default_channel_id": null, "discord_voice_enabled": false,
               "discord_slash_commands_enabled": true, "discord_webhook_url": null, "discord_permissions": null,
               "agent_instance_type": "automagik", "agent_api_url": "http://agent:8000", "agent_api_key": "agent-key", "agent_id": "default",
               "agent_type": "agent", "agent_timeout": 30, "agent_stream_mode": false, "default_agent": "bot", "automagik_instance_id": null,
               "automagik_instance_name": null, "profile_name": null, "profile_pic_url": null, "owner_jid": null, "is_default": true,
               "is_active": true, "enable_auto_split": true, "created_at": "2024-01-02T03:04:05", "updated_at": "2024-01-02T03:04:05.123456"})
    );
    let second = row(&mut db, "omni_instance_configs", "id = 12");
    assert_eq!(
        [&second["webhook_base64"], &second["is_default"], &second["is_active"], &second["agent_timeout"], &second["updated_at"], &second["created_at"]],
        [&json!(false), &json!(false), &json!(false), &Value::Null, &Value::Null, &json!("2024-02-03T04:05:06")]
    );
    assert_eq!(
        row(&mut db, "omni_users", "true"),
        json!({"id": "6f1c2b9e-0000-4000-8000-000000000001", "phone_number": "+15550001", "whatsapp_jid": "15550001@s.whatsapp.net",
               "instance_name": "main", "display_name": "Ada", "last_session_name_interaction": "session-a", "last_agent_user_id": null,
               "last_seen_at": "2024-03-01T10:00:00.5", "message_count": 42, "created_at": "2024-01-05T00:00:00", "updated_at": "2024-03-01T10:00:00.5"})
    );
    assert_eq!(
        row(&mut db, "omni_user_external_ids", "id = 5"),
        json!({"id": 5, "user_id": "6f1c2b9e-0000-4000-8000-000000000001", "provider": "slack", "external_id": "s-1", "instance_name": null,
               "created_at": "2024-01-08T00:00:00.25", "updated_at": "2024-01-08T00:00:00"})
    );
    assert_eq!(
        row(&mut db, "omni_access_rules", "id = 21"),
        json!({"id": 21, "instance_name": null, "phone_number": "+15559999", "rule_type": "block", "created_at": "2024-01-09T00:00:00", "updated_at": "2024-01-09T00:00:00"})
    );
    assert_eq!(row(&mut db, "omni_access_rules", "id = 22")["created_at"], "2024-01-09T00:00:00.000001");
    assert_eq!(
        row(&mut db, "omni_message_traces", "trace_id = '9a0b0000-0000-4000-8000-000000000001'"),
        json!({"trace_id": "9a0b0000-0000-4000-8000-000000000001", "instance_name": "main", "whatsapp_message_id": "WAMID.1",
               "sender_phone": "+15550001", "sender_name": "Ada", "sender_jid": "15550001@s.whatsapp.net", "message_type": "text",
               "has_media": false, "has_quoted_message": true, "message_length": 11, "session_name": "session-a",
               "agent_session_id": "agent-session-1", "received_at": "2024-03-01T10:00:00", "processing_started_at": "2024-03-01T10:00:00.1",
               "agent_request_at": "2024-03-01T10:00:00.2", "agent_response_at": "2024-03-01T10:00:01.999999",
               "evolution_send_at": "2024-03-01T10:00:02", "completed_at": "2024-03-01T10:00:02.5", "status": "completed",
               "error_message": null, "error_stage": null, "blocked_by_access_rule": false, "access_rule_id": 22, "blocking_reason": null,
               "agent_processing_time_ms": 1800, "total_processing_time_ms": 2500, "agent_request_tokens": 120, "agent_response_tokens": 80,
               "agent_response_success": true, "agent_response_length": 64, "agent_tools_used": 2, "evolution_response_code": 200,
               "evolution_success": true})
    );
    let failed = row(&mut db, "omni_message_traces", "trace_id = '9a0b0000-0000-4000-8000-000000000002'");
    assert_eq!(
        [&failed["instance_name"], &failed["access_rule_id"], &failed["has_media"], &failed["blocked_by_access_rule"], &failed["evolution_success"], &failed["error_message"]],
        [&Value::Null, &Value::Null, &json!(true), &json!(true), &json!(false), &json!("agent timed out")]
    );
    assert_eq!(
        row(&mut db, "omni_trace_payloads", "id = 100"),
        json!({"id": 100, "trace_id": "9a0b0000-0000-4000-8000-000000000001", "stage": "webhook_received", "payload_type": "request",
               "payload_compressed": fixture::PAYLOAD, "payload_size_original": 120, "payload_size_compressed": 28,
               "timestamp": "2024-03-01T10:00:00.000001", "status_code": null, "error_details": null, "contains_media": false, "contains_base64": true})
    );
    let loose = row(&mut db, "omni_trace_payloads", "id = 140");
    assert_eq!([&loose["trace_id"], &loose["contains_media"], &loose["status_code"]], [&Value::Null, &json!(true), &json!(201)]);

    // Every sequence continues past the largest imported id.
    let next = |db: &mut postgres::Client, sql: &str| db.query_one(sql, &[]).unwrap().get::<_, i32>(0);
    assert_eq!(next(&mut db, "INSERT INTO omni_instance_configs (name) VALUES ('fresh') RETURNING id"), 13);
    assert_eq!(next(&mut db, "INSERT INTO omni_access_rules (phone_number, rule_type) VALUES ('+1', 'allow') RETURNING id"), 23, "23 was an orphan, 22 the largest imported");
    assert_eq!(next(&mut db, "INSERT INTO omni_user_external_ids (user_id, provider, external_id) VALUES ('6f1c2b9e-0000-4000-8000-000000000001', 'x', 'y') RETURNING id"), 6);
    assert_eq!(next(&mut db, "INSERT INTO omni_trace_payloads (stage) VALUES ('new') RETURNING id"), 141);
    assert_eq!(next(&mut db, "INSERT INTO omni_global_settings (key) VALUES ('new') RETURNING id"), 1, "an empty table's sequence is untouched");

    // The last report is kept and shown by the migration check.
    let status = worker.request("GET", "/api/v1/migration/status").api_key().send().json();
    assert_eq!(status["last_import"]["imported"], 11, "{status}");
    assert_eq!(status["migration_recommended"], false, "the file found was imported: {status}");
    assert!(worker.log().contains("import: table done"), "the log tells the import per table");
}

#[test]
fn imports_the_prefixed_era_with_settings_history_and_a_later_revision() {
    let pg = TempPostgres::start_new();
    let (worker, root) = worker(&pg);
    fixture::prefixed_era(&root.join("data/omni.db"));

    let report = imported(&worker, json!({"path": "data/omni.db"}));
    assert_eq!(table(&report, "omni_global_settings")["source_table"], "omni_global_settings");
    assert_eq!(counts(&report, "omni_global_settings"), [2, 2, 0, 0, 0]);
    assert_eq!(counts(&report, "omni_setting_change_history"), [2, 1, 0, 0, 1]);
    assert!(table(&report, "omni_setting_change_history")["skipped"][0]["examples"][0].as_str().unwrap().contains("setting_id=99"));
    assert_eq!(counts(&report, "omni_instance_configs"), [1, 1, 0, 0, 0]);
    assert_eq!(table(&report, "omni_instance_configs")["columns_dropped"], json!(["obsolete_column"]));
    assert_eq!(counts(&report, "omni_trace_payloads"), [0, 0, 0, 0, 0]);

    let mut db = pg.client();
    assert_eq!(
        row(&mut db, "omni_global_settings", "id = 1"),
        json!({"id": 1, "key": "max_message_length", "value": "4096", "value_type": "integer", "category": "limits",
               "description": "Longest message sent", "is_secret": false, "is_required": true, "default_value": "4096",
               "validation_rules": "{\"min\": 1}", "created_at": "2024-04-01T00:00:00", "updated_at": "2024-04-02T00:00:00.75",
               "created_by": "admin", "updated_by": null})
    );
    assert_eq!(row(&mut db, "omni_global_settings", "id = 5")["is_secret"], true);
    assert_eq!(
        row(&mut db, "omni_setting_change_history", "id = 1"),
        json!({"id": 1, "setting_id": 1, "old_value": "2048", "new_value": "4096", "changed_by": "admin",
               "changed_at": "2024-04-02T00:00:00.75", "change_reason": "longer messages"})
    );
    assert_eq!(
        row(&mut db, "omni_instance_configs", "id = 3"),
        json!({"id": 3, "name": "discord-bot", "channel_type": "discord", "evolution_url": null, "evolution_key": null,
               "whatsapp_instance": null, "session_id_prefix": null, "webhook_base64": true, "discord_bot_token": "bot-token",
               "discord_client_id": "client-1", "discord_guild_id": "guild-1", "discord_default_channel_id": "chan-1",
               "discord_voice_enabled": true, "discord_slash_commands_enabled": false, "discord_webhook_url": null,
               "discord_permissions": 2048, "agent_instance_type": "hive", "agent_api_url": "http://hive", "agent_api_key": "hk",
               "agent_id": "agent-7", "agent_type": "team", "agent_timeout": 90, "agent_stream_mode": true, "default_agent": null,
               "automagik_instance_id": null, "automagik_instance_name": null, "profile_name": "Bot", "profile_pic_url": null,
               "owner_jid": null, "is_default": false, "is_active": true, "enable_auto_split": false,
               "created_at": "2024-05-01T00:00:00", "updated_at": "2024-05-01T00:00:00.999999"})
    );
    assert_eq!(row(&mut db, "omni_users", "true")["last_agent_user_id"], "agent-user-9");
    // A trace table of few columns: the rest take the target's defaults.
    let trace = row(&mut db, "omni_message_traces", "true");
    assert_eq!(
        [&trace["instance_name"], &trace["status"], &trace["has_media"], &trace["agent_tools_used"], &trace["received_at"]],
        [&json!("discord-bot"), &Value::Null, &json!(false), &json!(0), &json!("2024-05-03T00:00:00")]
    );
    let next: i32 = db.query_one("INSERT INTO omni_global_settings (key) VALUES ('later') RETURNING id", &[]).unwrap().get(0);
    assert_eq!(next, 6);
}

#[test]
fn a_dry_run_writes_nothing_and_reports_what_the_import_will_do() {
    let pg = TempPostgres::start_new();
    let (worker, root) = worker(&pg);
    fixture::old_era(&root.join("data/automagik-omni.db"));
    let mut db = pg.client();
    let before = snapshot(&mut db);
    let sequences = |db: &mut postgres::Client| -> Vec<Option<i64>> {
        TABLES.iter().filter(|t| !matches!(**t, "omni_users" | "omni_message_traces"))
            .map(|t| db.query_one(&format!("SELECT pg_sequence_last_value(pg_get_serial_sequence('{t}', 'id')::regclass)"), &[]).unwrap().get(0))
            .collect()
    };
    let sequences_before = sequences(&mut db);

    let dry = imported(&worker, json!({"dry_run": true}));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["safety_backup"], Value::Null);
    assert_eq!(snapshot(&mut db), before, "a dry run changes no row");
    assert_eq!(sequences(&mut db), sequences_before, "nor a sequence");
    assert_eq!(backups(&root), 0, "nor takes a backup");
    let status = worker.request("GET", "/api/v1/migration/status").api_key().send().json();
    assert_eq!(status["last_import"], Value::Null, "nor keeps a report");

    let real = imported(&worker, json!({}));
    for key in ["rows_in_file", "imported", "already_present", "conflicts", "skipped"] {
        assert_eq!(dry[key], real[key], "{key}: the dry run said what the import did");
    }
    for name in TABLES {
        assert_eq!(counts(&dry, name), counts(&real, name), "{name}");
    }
}

#[test]
fn importing_the_same_file_again_changes_nothing_and_reports_conflicts() {
    let pg = TempPostgres::start_new();
    let (worker, root) = worker(&pg);
    let file = root.join("data/automagik-omni.db");
    fixture::old_era(&file);
    let hash = fixture::sha256(&file);
    let first = imported(&worker, json!({"path": file.display().to_string()}));
    let mut db = pg.client();
    let after_first = snapshot(&mut db);

    let second = imported(&worker, json!({}));
    assert_eq!(second["imported"], 0, "{second}");
    assert_eq!(second["already_present"], first["imported"]);
    assert_eq!(second["conflicts"], 0);
    assert_eq!(second["skipped"], first["skipped"], "orphans are still orphans");
    assert_eq!(snapshot(&mut db), after_first);

    // A row changed since: a conflict, left as it is.
    db.execute("UPDATE omni_instance_configs SET agent_timeout = 99 WHERE id = 7", &[]).unwrap();
    // A name taken by another id: a conflict on a unique value.
    db.execute("DELETE FROM omni_access_rules WHERE id = 22", &[]).unwrap();
    db.execute("INSERT INTO omni_access_rules (id, instance_name, phone_number, rule_type) VALUES (500, 'main', '+15550001', 'allow')", &[]).unwrap();
    let third = imported(&worker, json!({}));
    assert_eq!(counts(&third, "omni_instance_configs"), [2, 0, 1, 1, 0]);
    assert_eq!(table(&third, "omni_instance_configs")["conflict_examples"], json!(["id=7"]));
    assert_eq!(row(&mut db, "omni_instance_configs", "id = 7")["agent_timeout"], 99, "the present row is kept");
    // Rule 22 is new by id again, but its (instance, phone, type) is taken: not written.
    assert_eq!(counts(&third, "omni_access_rules"), [3, 0, 1, 1, 1]);
    assert_eq!(db.query_one("SELECT count(*) FROM omni_access_rules", &[]).unwrap().get::<_, i64>(0), 2);
    assert_eq!(fixture::sha256(&file), hash);
}

#[test]
fn refuses_files_that_are_not_databases_and_paths_outside_the_data_root() {
    let pg = TempPostgres::start_new();
    let (worker, root) = worker(&pg);
    let data = root.join("data");
    std::fs::write(data.join("empty.db"), b"").unwrap();
    std::fs::write(data.join("notes.db"), b"these are not the tables you are looking for\n".repeat(100)).unwrap();
    let good = data.join("good.db");
    fixture::old_era(&good);
    let mut bytes = std::fs::read(&good).unwrap();
    // Keep the header, damage every page after the first.
    for b in bytes.iter_mut().skip(4096) {
        *b = 0xa5;
    }
    std::fs::write(data.join("corrupt.db"), &bytes).unwrap();
    std::fs::write(data.join("truncated.db"), &std::fs::read(&good).unwrap()[..5000]).unwrap();
    let outside = omni_tests::TempDir::new("outside");
    fixture::old_era(&outside.path().join("secret.db"));
    std::os::unix::fs::symlink(outside.path().join("secret.db"), data.join("link.db")).unwrap();
    let mut db = pg.client();
    let before = snapshot(&mut db);

    for (path, status, code) in [
        ("data/empty.db", 422, "sqlite_empty"),
        ("data/notes.db", 422, "not_sqlite"),
        ("data/corrupt.db", 422, "sqlite_corrupt"),
        ("data/truncated.db", 422, "sqlite_corrupt"),
        ("data/missing.db", 404, "sqlite_not_found"),
        ("data", 404, "sqlite_not_found"),
        ("/etc/passwd", 404, "sqlite_not_found"),
        ("../../../../../../etc/passwd", 404, "sqlite_not_found"),
        ("data/link.db", 404, "sqlite_not_found"),
    ] {
        let response = import(&worker, json!({"path": path}));
        let body = response.json();
        assert_eq!((response.status, body["code"].as_str().unwrap()), (status, code), "{path}: {body}");
        assert!(!body["detail"].as_str().unwrap().is_empty());
    }
    let outside_path = outside.path().join("secret.db").display().to_string();
    assert_eq!(import(&worker, json!({"path": outside_path})).status, 404, "an absolute path outside the data root");
    assert_eq!(import(&worker, json!({"path": "data/\u{1}x.db"})).status, 400, "control characters");
    assert_eq!(import(&worker, json!({"path": "x", "extra": 1})).status, 400);
    let detail = import(&worker, json!({"path": "data/notes.db"})).json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("not an SQLite database") && detail.contains("nothing was written"), "{detail}");

    let unauthenticated = worker.request("POST", "/api/v1/migration/import").json(&json!({})).send();
    assert_eq!(unauthenticated.status, 401);
    let wrong_type = worker.request("POST", "/api/v1/migration/import").api_key().raw_body("text/plain", "data/good.db").send();
    assert_eq!((wrong_type.status, wrong_type.json()["code"].as_str().unwrap()), (415, "unsupported_media_type"));
    let no_file = worker.request("POST", "/api/v1/migration/import").api_key().json(&json!({})).send();
    assert_eq!((no_file.status, no_file.json()["code"].as_str().unwrap()), (404, "sqlite_not_detected"));

    assert_eq!(snapshot(&mut db), before, "nothing was written");
    assert_eq!(backups(&root), 0, "the checks come before the safety backup");
}

#[test]
fn the_migration_defines_what_the_importer_writes() {
    let pg = TempPostgres::start_new();
    let (_worker, _root) = worker(&pg);
    let mut db = pg.client();
    for table in &omni_contract::import::schema::TABLES {
        let rows = db
            .query(
                "SELECT column_name::text, data_type::text, is_nullable = 'NO', character_maximum_length FROM information_schema.columns
                 WHERE table_name = $1 ORDER BY ordinal_position",
                &[&table.name],
            )
            .unwrap();
        let actual: Vec<(String, String, bool, Option<i32>)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
        let expected: Vec<(String, String, bool, Option<i32>)> = table
            .columns
            .iter()
            .map(|c| {
                use omni_contract::import::schema::Kind;
                let kind = match c.kind {
                    Kind::Int => "integer",
                    Kind::Bool => "boolean",
                    Kind::Timestamp => "timestamp without time zone",
                    Kind::Text if actual.iter().any(|a| a.0 == c.name && a.1 == "text") => "text",
                    Kind::Text => "character varying",
                };
                (c.name.to_owned(), kind.to_owned(), c.not_null, c.max_chars.map(|n| n as i32))
            })
            .collect();
        assert_eq!(actual, expected, "{}", table.name);
    }
}

#[test]
fn a_large_table_keeps_its_indexes_and_references_and_a_bad_parent_is_still_caught() {
    let pg = TempPostgres::start_new();
    let (worker, root) = worker(&pg);
    let file = root.join("data/automagik-omni.db");
    fixture::large(&file, 12_000, 50);
    // A trace PostgreSQL cannot take: its payload, copied straight in, breaks
    // the reference when it is made again after the copy.
    let db = rusqlite::Connection::open(&file).unwrap();
    db.execute("UPDATE message_traces SET received_at = 'the day before yesterday' WHERE trace_id = '00000000-0000-4000-8000-000000000007'", []).unwrap();
    drop(db);
    let mut pgdb = pg.client();
    let shape = |db: &mut postgres::Client| -> (i64, i64) {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM pg_indexes WHERE tablename LIKE 'omni\\_%'),
                        (SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid::regclass::text LIKE 'omni\\_%')",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    let before = shape(&mut pgdb);

    let report = imported(&worker, json!({}));
    assert_eq!(counts(&report, "omni_message_traces"), [12_000, 11_999, 0, 0, 1]);
    assert_eq!(counts(&report, "omni_trace_payloads"), [12_000, 11_999, 0, 0, 1]);
    let payloads = table(&report, "omni_trace_payloads");
    assert!(payloads["skipped"][0]["reason"].as_str().unwrap().contains("orphan"), "{payloads}");
    assert!(payloads["skipped"][0]["examples"][0].as_str().unwrap().contains("000000000007"), "{payloads}");
    assert_eq!(shape(&mut pgdb), before, "every index and foreign key is there after the import");
    let orphans: i64 = pgdb
        .query_one("SELECT count(*) FROM omni_trace_payloads p WHERE NOT EXISTS (SELECT 1 FROM omni_message_traces t WHERE t.trace_id = p.trace_id)", &[])
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);
}

/// The old product killed in the middle of a commit (rollback-journal mode):
/// the file holds pages of an unfinished transaction, `<file>-journal` the
/// pages as they were. Reading the file alone would import torn data.
#[test]
fn a_database_with_a_hot_rollback_journal_is_refused_until_sqlite_rolls_it_back() {
    let pg = TempPostgres::start_new();
    let (worker, root) = worker(&pg);
    let data = root.join("data");
    let live = omni_tests::TempDir::new("live-sqlite");
    let path = live.path().join("omni.db");
    fixture::old_era(&path);

    // A transaction big enough to spill into the file before it commits,
    // copied (file and journal) while it is open: what a crash leaves.
    let writer = rusqlite::Connection::open(&path).unwrap();
    writer.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA cache_size = 5; BEGIN IMMEDIATE;").unwrap();
    writer
        .execute_batch(
            "CREATE TABLE filler (x BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
             INSERT INTO filler SELECT randomblob(1000) FROM n;",
        )
        .unwrap();
    let journal = live.path().join("omni.db-journal");
    assert!(std::fs::metadata(&journal).unwrap().len() > 0, "the open transaction has a journal");
    std::fs::copy(&path, data.join("torn.db")).unwrap();
    std::fs::copy(&journal, data.join("torn.db-journal")).unwrap();
    writer.execute_batch("ROLLBACK").unwrap();
    drop(writer);

    let mut db = pg.client();
    let before = snapshot(&mut db);
    let refused = import(&worker, json!({"path": "data/torn.db"}));
    assert_eq!(refused.status, 422, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["code"], "sqlite_hot_journal", "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("torn.db-journal") && detail.contains("sqlite3") && detail.contains("nothing was written"), "{detail}");
    assert_eq!(snapshot(&mut db), before, "nothing was written");
    assert_eq!(backups(&root), 0, "refused before the safety backup");

    // Opened once with SQLite (read-write), the journal is rolled back and removed: the import then works.
    let check: String = rusqlite::Connection::open(data.join("torn.db")).unwrap().query_row("PRAGMA quick_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    assert!(!data.join("torn.db-journal").exists());
    imported(&worker, json!({"path": "data/torn.db"}));
}
