//! Every end-to-end test, one module per file, in one test binary: one
//! link instead of one per file, so a change to the kit relinks once
//! (`cargo nextest run -p omni-tests -E 'test(/^upgrade::/)'` runs one file).
//! The shared helpers in `support/` are declared here, once.

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/replication.rs"]
mod kit;
#[path = "support/source.rs"]
mod source;
#[path = "support/sqlite_fixture.rs"]
mod fixture;

mod api_accounts;
mod api_backup;
mod api_hostile;
mod api_limiter;
mod api_preferences;
mod api_resilience;
mod api_roles;
mod api_setup;
mod api_static;
mod backup_cli;
mod backup_hostile_names;
mod gateway_children;
mod gateway_data_root;
mod gateway_dev;
mod gateway_http_threads;
mod gateway_journal;
mod gateway_lock;
mod gateway_logring;
mod gateway_logs;
mod gateway_postgres;
mod gateway_privilege;
mod gateway_proxy;
mod gateway_settings;
mod gateway_supervision;
mod gateway_tls;
mod gateway_tls_acme;
mod ha_patroni;
mod import_doors;
mod import_sqlite;
mod ops_deploy;
mod ops_docker;
mod ops_doctor;
mod ops_external_database;
mod ops_install;
mod ops_load_balancer;
mod offsite_by_hand;
mod offsite_crypt;
mod offsite_disaster;
mod offsite_drill;
mod offsite_probe;
mod offsite_restore;
mod offsite_resume;
mod offsite_rotate;
mod offsite_ship;
mod offsite_stores;
mod offsite_sse;
mod offsite_upload;
mod offsite_write_only;
mod pitr;
mod pitr_api;
mod pitr_checksums;
mod pitr_full_disk;
mod pitr_local_crypt;
mod pitr_memory_backups;
mod pitr_recovery;
mod pitr_timelines;
mod pitr_upgrade;
mod replication;
mod replication_ddl;
mod replication_lifecycle;
mod replication_stream;
mod upgrade;
