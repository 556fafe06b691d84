//! The old cluster's own configuration, carried into the cluster a major
//! upgrade builds (`pg_upgrade` moves the data, never the configuration).
//!
//! * `postgresql.conf`: every setting the old file makes that the new
//!   `initdb`'s file does not already make with the same value is appended
//!   to the new file under a marked comment;
//! * `postgresql.auto.conf` (`ALTER SYSTEM`): its settings are written into
//!   the new one;
//! * `pg_hba.conf` and `pg_ident.conf` are copied as they are.
//!
//! A setting the new major no longer knows (for instance
//! `old_snapshot_threshold`, gone in PostgreSQL 17) would stop the new
//! server from starting, so it is left out and named in the log and the
//! upgrade's record. So are paths that belong to the old cluster
//! (`data_directory`, `hba_file`, …) and `include` directives (what they
//! include is not part of the data directory). Settings the gateway passes
//! on the command line (port, listen address, WAL level …) win over these
//! files, as before the upgrade.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::binaries::Binaries;
use crate::process::child::ChildSpec;

/// What was carried over and what was left out (with why), for the log and
/// the upgrade's record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Carried {
    pub settings: Vec<String>,
    pub skipped: Vec<String>,
}

/// Paths and names that describe the old cluster itself.
const NEVER_CARRIED: &[&str] = &["data_directory", "config_file", "hba_file", "ident_file", "external_pid_file"];
const INCLUDES: &[&str] = &["include", "include_if_exists", "include_dir"];

/// One `name = value` line of a PostgreSQL configuration file, the value as
/// written (quotes included); `None` for blank lines and comments.
pub fn parse_line(line: &str) -> Option<(String, String)> {
    let line = line.trim_start();
    let name_len = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(line.len());
    if name_len == 0 || !line.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        return None;
    }
    let name = line[..name_len].to_ascii_lowercase();
    let rest = line[name_len..].trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    let value = if let Some(quoted) = rest.strip_prefix('\'') {
        // '' and \' inside single quotes, as PostgreSQL's lexer reads them.
        let bytes = quoted.as_bytes();
        let mut i = 0;
        loop {
            match bytes.get(i) {
                None => break rest.to_string(),
                Some(b'\\') => i += 2,
                Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                Some(b'\'') => break rest[..i + 2].to_string(),
                Some(_) => i += 1,
            }
        }
    } else {
        rest.split(|c: char| c.is_whitespace() || c == '#').next().unwrap_or("").to_string()
    };
    Some((name, value))
}

/// The settings a file makes, the last occurrence of a name winning (as in
/// PostgreSQL), in the order they first appear.
fn settings_of(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in text.lines().filter_map(parse_line) {
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => out.push((name, value)),
        }
    }
    out
}

/// The settings the new major knows (`postgres --describe-config`, which
/// PostgreSQL allows even as root and which reads no data directory). When
/// the gateway is root it runs as the account that owns `data_dir` (the
/// cluster's, PostgreSQL's), like every other child.
fn known_settings(new: &Binaries, data_dir: &Path) -> Result<BTreeSet<String>> {
    use std::os::unix::fs::MetadataExt;
    let mut spec = ChildSpec::new("postgres --describe-config", new.postgres()).arg("--describe-config");
    spec.env_remove.push("PGDATA".into());
    if nix::unistd::Uid::effective().is_root() {
        let meta = std::fs::metadata(data_dir).with_context(|| format!("reading {}", data_dir.display()))?;
        spec.run_as = (meta.uid() != 0).then_some((meta.uid(), meta.gid()));
    }
    let out = crate::process::child::output_blocking(spec)
        .with_context(|| format!("could not run {} --describe-config", new.postgres().display()))?;
    if !out.status.success() {
        anyhow::bail!("{} --describe-config failed: {}", new.postgres().display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split('\t').next()).map(str::to_ascii_lowercase).collect())
}

/// Decides, for the old file's settings, which go into the new cluster.
/// `already`: what the new `initdb`'s file sets. Pure, for the tests.
pub fn choose(old: &[(String, String)], already: &[(String, String)], known: &BTreeSet<String>, file: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut keep = Vec::new();
    let mut skipped = Vec::new();
    for (name, value) in old {
        if INCLUDES.contains(&name.as_str()) {
            skipped.push(format!("{name} {value} in {file} (not followed: copy what it names by hand)"));
        } else if NEVER_CARRIED.contains(&name.as_str()) {
            skipped.push(format!("{name} in {file} (a path of the old cluster)"));
        } else if !name.contains('.') && !known.contains(name) {
            skipped.push(format!("{name} in {file} (unknown to the new PostgreSQL major)"));
        } else if already.iter().any(|(n, v)| n == name && v == value) {
            // The new initdb made the same choice.
        } else {
            keep.push((name.clone(), value.clone()));
        }
    }
    (keep, skipped)
}

/// Carries `old_dir`'s configuration into the freshly initialised `new_dir`.
pub fn carry(old_dir: &Path, new_dir: &Path, new: &Binaries, from: u32) -> Result<Carried> {
    let known = known_settings(new, old_dir)?;
    let mut carried = Carried::default();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

    let conf = new_dir.join("postgresql.conf");
    let (keep, skipped) = choose(&settings_of(&read(&old_dir.join("postgresql.conf"))), &settings_of(&read(&conf)), &known, "postgresql.conf");
    if !keep.is_empty() {
        let mut f = std::fs::OpenOptions::new().append(true).open(&conf).with_context(|| format!("could not open {}", conf.display()))?;
        let mut text = format!("\n# Carried over from the PostgreSQL {from} cluster's postgresql.conf by omni-gateway's major upgrade.\n");
        for (name, value) in &keep {
            text.push_str(&format!("{name} = {value}\n"));
        }
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("could not write {}", conf.display()))?;
    }
    carried.settings.extend(keep.into_iter().map(|(n, _)| n));
    carried.skipped.extend(skipped);

    let auto = new_dir.join("postgresql.auto.conf");
    let (keep, skipped) = choose(&settings_of(&read(&old_dir.join("postgresql.auto.conf"))), &[], &known, "postgresql.auto.conf");
    if !keep.is_empty() {
        let mut text = "# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n".to_string();
        for (name, value) in &keep {
            text.push_str(&format!("{name} = {value}\n"));
        }
        // Truncating keeps the file's owner (the PostgreSQL account).
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).create(true).open(&auto).with_context(|| format!("could not open {}", auto.display()))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("could not write {}", auto.display()))?;
    }
    carried.settings.extend(keep.into_iter().map(|(n, _)| format!("{n} (ALTER SYSTEM)")));
    carried.skipped.extend(skipped);

    for file in ["pg_hba.conf", "pg_ident.conf"] {
        let (from_file, to_file) = (old_dir.join(file), new_dir.join(file));
        if from_file.exists() && read(&from_file) != read(&to_file) {
            std::fs::copy(&from_file, &to_file).with_context(|| format!("could not copy {} to {}", from_file.display(), to_file.display()))?;
            carried.settings.push(file.to_string());
        }
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lines_as_postgresql_does() {
        assert_eq!(parse_line("work_mem = 64MB   # per sort"), Some(("work_mem".into(), "64MB".into())));
        assert_eq!(parse_line("  Log_Line_Prefix='%m [%p] it''s # not a comment' # one"), Some(("log_line_prefix".into(), "'%m [%p] it''s # not a comment'".into())));
        assert_eq!(parse_line("search_path '\"$user\", public'"), Some(("search_path".into(), "'\"$user\", public'".into())));
        assert_eq!(parse_line("pg_stat_statements.max = 5000"), Some(("pg_stat_statements.max".into(), "5000".into())));
        assert_eq!(parse_line("#shared_buffers = 128MB"), None);
        assert_eq!(parse_line(""), None);
        assert_eq!(parse_line("   # comment"), None);
    }

    #[test]
    fn carries_what_differs_and_leaves_out_what_the_new_major_would_refuse() {
        let old = settings_of(
            "max_connections = 100\nwork_mem = 8MB\nwork_mem = 16MB\nold_snapshot_threshold = 1min\ninclude 'extra.conf'\n\
             data_directory = '/old'\nmy_ext.setting = on\nshared_buffers = 256MB\n",
        );
        let already = settings_of("max_connections = 100\nshared_buffers = 128MB\n");
        let known: BTreeSet<String> = ["max_connections", "work_mem", "shared_buffers"].iter().map(|s| s.to_string()).collect();
        let (keep, skipped) = choose(&old, &already, &known, "postgresql.conf");
        assert_eq!(keep, vec![("work_mem".into(), "16MB".into()), ("my_ext.setting".into(), "on".into()), ("shared_buffers".into(), "256MB".into())]);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[0].starts_with("old_snapshot_threshold") && skipped[0].contains("unknown"), "{skipped:?}");
        assert!(skipped[1].starts_with("include 'extra.conf'"), "{skipped:?}");
        assert!(skipped[2].starts_with("data_directory"), "{skipped:?}");
    }
}
