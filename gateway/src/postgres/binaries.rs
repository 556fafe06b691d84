//! Finding PostgreSQL server binaries on this machine.
//!
//! Order (SPEC §2): `PGSERVE_BIN_DIR`; what `pg_config --bindir` names; the
//! newest `/usr/lib/postgresql/*/bin`; other usual install locations; last, a
//! download through `postgresql_embedded` when built with the `download`
//! feature. A system installation always wins over a download, so a machine
//! with PostgreSQL installed never touches the network.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory with usable `postgres` and `initdb`, and their version.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
    /// Major version, e.g. 15; compared against a cluster's `PG_VERSION`.
    pub major: u32,
    /// Full version string as `postgres --version` prints it.
    pub version: String,
    /// How the directory was found, for the startup log.
    pub found_by: &'static str,
}

impl Binaries {
    pub fn postgres(&self) -> PathBuf {
        self.dir.join("postgres")
    }
    pub fn initdb(&self) -> PathBuf {
        self.dir.join("initdb")
    }
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("PGSERVE_BIN_DIR={dir} has no usable PostgreSQL server: {problem}. Point PGSERVE_BIN_DIR at the directory that holds `postgres` and `initdb` (for example /usr/lib/postgresql/15/bin), or unset it to search automatically")]
    BadExplicitDir { dir: PathBuf, problem: String },
    #[error("no PostgreSQL server binaries found (looked in: {searched}). Install them, for example `apt-get install postgresql` on Debian/Ubuntu, `dnf install postgresql-server` on Fedora/RHEL, or `brew install postgresql@16` on macOS, or set PGSERVE_BIN_DIR{download}")]
    NotFound { searched: String, download: String },
}

/// Checks that `dir` holds `postgres` and `initdb` that run, and reads the version.
pub fn probe(dir: &Path, found_by: &'static str) -> Result<Binaries, String> {
    for exe in ["postgres", "initdb"] {
        let p = dir.join(exe);
        if !p.is_file() {
            return Err(format!("{} is missing", p.display()));
        }
    }
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .output()
        .map_err(|e| format!("could not run {}/postgres --version: {e}", dir.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major = parse_major(&version).ok_or_else(|| format!("unexpected `postgres --version` output {version:?}"))?;
    Ok(Binaries { dir: dir.to_path_buf(), major, version, found_by })
}

/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15; `9.6.24` → 9.
pub fn parse_major(version: &str) -> Option<u32> {
    let numbers = version.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    numbers.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Searches in SPEC order. `explicit` is `PGSERVE_BIN_DIR`.
pub fn find(explicit: Option<&Path>) -> Result<Binaries, FindError> {
    if let Some(dir) = explicit {
        return probe(dir, "PGSERVE_BIN_DIR").map_err(|problem| FindError::BadExplicitDir { dir: dir.to_path_buf(), problem });
    }
    let mut searched = Vec::new();
    for (dir, how) in candidates() {
        searched.push(dir.display().to_string());
        if let Ok(b) = probe(&dir, how) {
            return Ok(b);
        }
    }
    download_fallback(searched)
}

/// Candidate directories, best first.
fn candidates() -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
        if o.status.success() {
            let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if !dir.is_empty() {
                out.push((PathBuf::from(dir), "pg_config --bindir"));
            }
        }
    }
    for dir in versioned_dirs("/usr/lib/postgresql", "bin") {
        out.push((dir, "newest /usr/lib/postgresql/*/bin"));
    }
    // RHEL/Fedora PGDG packages, Homebrew, Postgres.app, source installs.
    for dir in versioned_dirs("/usr", "bin").into_iter().filter(|d| d.to_string_lossy().starts_with("/usr/pgsql-")) {
        out.push((dir, "/usr/pgsql-*/bin"));
    }
    for root in ["/opt/homebrew/opt", "/usr/local/opt"] {
        let mut dirs: Vec<_> = read_dir_names(Path::new(root))
            .into_iter()
            .filter(|n| n.starts_with("postgresql"))
            .map(|n| Path::new(root).join(n).join("bin"))
            .collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(version_key(&d.to_string_lossy())));
        out.extend(dirs.into_iter().map(|d| (d, "Homebrew")));
    }
    for dir in versioned_dirs("/Applications/Postgres.app/Contents/Versions", "bin") {
        out.push((dir, "Postgres.app"));
    }
    for dir in ["/usr/local/pgsql/bin", "/usr/local/bin", "/usr/bin"] {
        out.push((PathBuf::from(dir), "usual install location"));
    }
    out
}

/// `<root>/<version>/<leaf>` for every entry of `root`, newest version first.
fn versioned_dirs(root: &str, leaf: &str) -> Vec<PathBuf> {
    let mut names = read_dir_names(Path::new(root));
    names.sort_by_key(|n| std::cmp::Reverse(version_key(n)));
    names.into_iter().map(|n| Path::new(root).join(n).join(leaf)).filter(|d| d.is_dir()).collect()
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Numeric parts of a name, so `16` sorts above `9.6` and `postgresql@16` above `postgresql@14`.
fn version_key(name: &str) -> Vec<u32> {
    name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

#[cfg(feature = "download")]
fn download_fallback(searched: Vec<String>) -> Result<Binaries, FindError> {
    tracing::info!("no PostgreSQL installation found; downloading PostgreSQL binaries (postgresql_embedded), this can take a minute");
    let not_found = |why: String| FindError::NotFound { searched: searched.join(", "), download: format!("; the download fallback failed too: {why}") };
    let install_root = super::cluster::cache_dir().join("downloaded-postgresql");
    // postgresql_embedded's setup() installs, then runs initdb unless the data
    // directory looks initialised. The gateway runs initdb itself (as the right
    // user), so it is handed a throw-away directory that looks initialised.
    let marker = std::env::temp_dir().join(format!("omni-pg-download-{}", std::process::id()));
    std::fs::create_dir_all(&marker).and_then(|_| std::fs::write(marker.join("postgresql.conf"), "")).map_err(|e| not_found(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| not_found(e.to_string()))?;
    let dir = runtime.block_on(async {
        let settings = postgresql_embedded::Settings { installation_dir: install_root, data_dir: marker.clone(), ..Default::default() };
        let mut pg = postgresql_embedded::PostgreSQL::new(settings);
        pg.setup().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(pg.settings().binary_dir())
    });
    let _ = std::fs::remove_dir_all(&marker);
    let dir = dir.map_err(not_found)?;
    probe(&dir, "downloaded (postgresql_embedded)").map_err(not_found)
}

#[cfg(not(feature = "download"))]
fn download_fallback(searched: Vec<String>) -> Result<Binaries, FindError> {
    Err(FindError::NotFound {
        searched: searched.join(", "),
        download: " (this build has no download fallback: rebuild with `--features download` to fetch binaries automatically)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_major_versions() {
        assert_eq!(parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"), Some(15));
        assert_eq!(parse_major("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major("postgres (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(parse_major("nonsense"), None);
    }

    #[test]
    fn newer_versions_sort_first() {
        let mut v = vec!["9.6", "16", "15", "postgresql@14"];
        v.sort_by_key(|n| std::cmp::Reverse(version_key(n)));
        assert_eq!(v, ["16", "15", "postgresql@14", "9.6"]);
    }

    #[test]
    fn explicit_dir_without_binaries_is_a_clear_error() {
        let err = find(Some(Path::new("/nonexistent/pg/bin"))).unwrap_err().to_string();
        assert!(err.contains("PGSERVE_BIN_DIR=/nonexistent/pg/bin"), "{err}");
        assert!(err.contains("postgres is missing"), "{err}");
    }
}
