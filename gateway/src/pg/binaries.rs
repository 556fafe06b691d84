//! Finding PostgreSQL server binaries on this machine.
//!
//! Order (SPEC §2): `PGSERVE_BIN_DIR`; what `pg_config --bindir` names; the
//! newest `/usr/lib/postgresql/*/bin`; other usual install locations; last, a
//! download through `postgresql_embedded` when built with the `download`
//! feature. A system installation always wins over a download, so a machine
//! with PostgreSQL installed never touches the network.
//!
//! What a search learns is cached in `binaries.json` in the cache directory:
//! running `pg_config` (a shell script on Debian) and `postgres --version`
//! costs about 20 ms, a fifth of a warm start. Each entry is keyed by a
//! *stamp*, the path, size and modification time of every file and
//! directory its answer depends on (the binaries, `pg_config`, the
//! directories searched); a changed stamp means the answer is worked out
//! again, so installing or upgrading PostgreSQL is noticed at the next start.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::process::child::ChildSpec;

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
    probe_cached(dir, found_by, &mut Cache::default())
}

fn probe_cached(dir: &Path, found_by: &'static str, cache: &mut Cache) -> Result<Binaries, String> {
    for exe in ["postgres", "initdb"] {
        let p = dir.join(exe);
        if !p.is_file() {
            return Err(format!("{} is missing", p.display()));
        }
    }
    let stamp = stamp(&[&dir.join("postgres"), &dir.join("initdb")]);
    let key = dir.to_string_lossy().into_owned();
    if let Some(entry) = cache.probes.get(&key).filter(|e| e.stamp == stamp) {
        if let Some(major) = parse_major(&entry.version) {
            return Ok(Binaries { dir: dir.to_path_buf(), major, version: entry.version.clone(), found_by });
        }
    }
    let out = crate::process::child::output_blocking(ChildSpec::new("postgres --version", dir.join("postgres")).arg("--version"))
        .map_err(|e| format!("could not run {}/postgres --version: {e}", dir.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major = parse_major(&version).ok_or_else(|| format!("unexpected `postgres --version` output {version:?}"))?;
    cache.probes.insert(key, Probed { stamp, version: version.clone() });
    cache.changed = true;
    Ok(Binaries { dir: dir.to_path_buf(), major, version, found_by })
}

/// `binaries.json`: what earlier searches learned.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Cache {
    /// Directory → its binaries' version.
    #[serde(default)]
    probes: BTreeMap<String, Probed>,
    /// The outcome of the automatic search.
    #[serde(default)]
    search: Option<Searched>,
    /// Whether anything was learned that the file does not hold yet.
    #[serde(skip)]
    changed: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Probed {
    stamp: String,
    version: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Searched {
    stamp: String,
    dir: PathBuf,
    found_by: String,
}

impl Cache {
    fn path() -> PathBuf {
        cache_dir().join("binaries.json")
    }

    /// The cache, or an empty one when there is none or it is unreadable.
    fn load() -> Cache {
        std::fs::read(Cache::path()).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
    }

    /// Written to a temporary file and renamed, so concurrent gateways never
    /// read half of one. A cache that cannot be written only costs time.
    fn save(&self) {
        if !self.changed {
            return;
        }
        let path = Cache::path();
        let temp = path.with_file_name(format!(".binaries.json.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("the cache file has a directory"))?;
            std::fs::write(&temp, serde_json::to_vec_pretty(self)?)?;
            std::fs::rename(&temp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&temp);
            tracing::debug!("could not write the binaries cache {}: {e}", path.display());
        }
    }
}

/// Path, size and modification time (ns) of each path, following symlinks;
/// `-` for one that does not exist.
fn stamp(paths: &[&Path]) -> String {
    let mut out = String::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(m) => out.push_str(&format!("{}:{}:{}.{};", path.display(), m.len(), m.mtime(), m.mtime_nsec())),
            Err(_) => out.push_str(&format!("{}:-;", path.display())),
        }
    }
    out
}

/// What the automatic search's answer depends on: `PATH` and the
/// `pg_config` it finds, and every directory the search lists or looks in
/// (installing a version adds an entry, which changes the directory's time).
fn search_stamp() -> String {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let pg_config = std::env::split_paths(&path_var).map(|d| d.join("pg_config")).find(|p| p.is_file());
    let mut watched: Vec<PathBuf> = pg_config.into_iter().collect();
    watched.extend(
        ["/usr/lib/postgresql", "/usr", "/opt/homebrew/opt", "/usr/local/opt", "/Applications/Postgres.app/Contents/Versions", "/usr/local/pgsql/bin", "/usr/local/bin", "/usr/bin"]
            .iter()
            .map(PathBuf::from),
    );
    let refs: Vec<&Path> = watched.iter().map(PathBuf::as_path).collect();
    format!("PATH={};{}", path_var.to_string_lossy(), stamp(&refs))
}

/// The `found_by` labels [`candidates`] gives, so a cached one maps back to its `&'static str`.
const FOUND_BY: &[&str] = &["pg_config --bindir", "newest /usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "Homebrew", "Postgres.app", "usual install location"];

/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15; `9.6.24` → 9.
pub fn parse_major(version: &str) -> Option<u32> {
    let numbers = version.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    numbers.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Searches in SPEC order. `explicit` is `PGSERVE_BIN_DIR`.
pub fn find(explicit: Option<&Path>) -> Result<Binaries, FindError> {
    let mut cache = Cache::load();
    let found = find_with(explicit, &mut cache);
    cache.save();
    found
}

fn find_with(explicit: Option<&Path>, cache: &mut Cache) -> Result<Binaries, FindError> {
    if let Some(dir) = explicit {
        return probe_cached(dir, "PGSERVE_BIN_DIR", cache).map_err(|problem| FindError::BadExplicitDir { dir: dir.to_path_buf(), problem });
    }
    let stamp = search_stamp();
    let remembered = cache.search.as_ref().filter(|s| s.stamp == stamp).and_then(|s| Some((s.dir.clone(), *FOUND_BY.iter().find(|f| **f == s.found_by)?)));
    if let Some((dir, how)) = remembered {
        if let Ok(b) = probe_cached(&dir, how, cache) {
            return Ok(b);
        }
    }
    let mut searched = Vec::new();
    for (dir, how) in candidates() {
        searched.push(dir.display().to_string());
        if let Ok(b) = probe_cached(&dir, how, cache) {
            cache.search = Some(Searched { stamp, dir: b.dir.clone(), found_by: how.to_owned() });
            cache.changed = true;
            return Ok(b);
        }
    }
    download_fallback(searched)
}

/// Candidate directories, best first.
fn candidates() -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    if let Ok(o) = crate::process::child::output_blocking(ChildSpec::new("pg_config", "pg_config").arg("--bindir")) {
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

/// The binaries of one given major (the older cluster's, for an upgrade):
/// `explicit` (`PGSERVE_OLD_BIN_DIR`) when set, else that major's usual
/// directories, else any directory of the general search holding it, else —
/// built with the `download` feature and when `download` is true — that
/// major downloaded by `postgresql_embedded`. `Err` says where it looked, for
/// a message that names what to install.
pub fn find_major(major: u32, explicit: Option<&Path>, download: bool) -> Result<Binaries, String> {
    let mut cache = Cache::load();
    let found = find_major_with(major, explicit, &mut cache);
    cache.save();
    match found {
        Err(why) if download && explicit.is_none() => download_major(major).map_err(|failed| format!("{why}{failed}")),
        found => found,
    }
}

/// Downloads PostgreSQL `major` (its newest minor release); `Err` is
/// appended to the search's message.
#[cfg(feature = "download")]
fn download_major(major: u32) -> Result<Binaries, String> {
    tracing::info!("downloading PostgreSQL {major} binaries for the upgrade (postgresql_embedded); this can take a minute");
    let version = postgresql_embedded::VersionReq::parse(&format!("={major}")).map_err(|e| format!("; downloading it failed: {e}"))?;
    match download(Some(version)) {
        Ok(b) if b.major == major => Ok(b),
        Ok(b) => Err(format!("; the download gave PostgreSQL {}, not {major}", b.major)),
        Err(e) => Err(format!("; downloading it failed too: {e}")),
    }
}

#[cfg(not(feature = "download"))]
fn download_major(_major: u32) -> Result<Binaries, String> {
    Err(" (this build has no download fallback: rebuild with `--features download` to fetch them automatically)".into())
}

fn find_major_with(major: u32, explicit: Option<&Path>, cache: &mut Cache) -> Result<Binaries, String> {
    if let Some(dir) = explicit {
        let b = probe_cached(dir, "PGSERVE_OLD_BIN_DIR", cache).map_err(|problem| format!("PGSERVE_OLD_BIN_DIR={}: {problem}", dir.display()))?;
        if b.major != major {
            return Err(format!("PGSERVE_OLD_BIN_DIR={} holds PostgreSQL {}, not {major}", dir.display(), b.major));
        }
        return Ok(b);
    }
    let mut dirs: Vec<(PathBuf, &'static str)> = [
        format!("/usr/lib/postgresql/{major}/bin"),
        format!("/usr/pgsql-{major}/bin"),
        format!("/opt/homebrew/opt/postgresql@{major}/bin"),
        format!("/usr/local/opt/postgresql@{major}/bin"),
        format!("/Applications/Postgres.app/Contents/Versions/{major}/bin"),
    ]
    .into_iter()
    .map(|d| (PathBuf::from(d), "usual place of that major"))
    .collect();
    dirs.extend(candidates());
    let mut searched = Vec::new();
    for (dir, how) in dirs {
        if searched.contains(&dir) {
            continue;
        }
        if let Ok(b) = probe_cached(&dir, how, cache) {
            if b.major == major {
                return Ok(b);
            }
        }
        searched.push(dir);
    }
    Err(format!("no PostgreSQL {major} binaries found (looked in: {})", searched.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")))
}

#[cfg(feature = "download")]
fn download_fallback(searched: Vec<String>) -> Result<Binaries, FindError> {
    tracing::info!("no PostgreSQL installation found; downloading PostgreSQL binaries (postgresql_embedded), this can take a minute");
    download(None).map_err(|why| FindError::NotFound { searched: searched.join(", "), download: format!("; the download fallback failed too: {why}") })
}

/// Downloads PostgreSQL (`version`, else postgresql_embedded's default) into
/// the cache directory, once, and probes it. On its own thread:
/// `postgresql_embedded` needs a runtime, and the caller may be running
/// inside one.
#[cfg(feature = "download")]
fn download(version: Option<postgresql_embedded::VersionReq>) -> Result<Binaries, String> {
    let install_root = cache_dir().join("downloaded-postgresql");
    std::thread::spawn(move || {
        // postgresql_embedded's setup() installs, then runs initdb unless the
        // data directory looks initialised. The gateway runs initdb itself (as
        // the right user), so it is handed a throw-away directory that looks
        // initialised.
        let marker = std::env::temp_dir().join(format!("omni-pg-download-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&marker).and_then(|_| std::fs::write(marker.join("postgresql.conf"), "")).map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let dir = runtime.block_on(async {
            let mut settings = postgresql_embedded::Settings { installation_dir: install_root, data_dir: marker.clone(), ..Default::default() };
            if let Some(version) = version {
                settings.version = version;
            }
            let mut pg = postgresql_embedded::PostgreSQL::new(settings);
            pg.setup().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(pg.settings().binary_dir())
        });
        let _ = std::fs::remove_dir_all(&marker);
        probe(&dir?, "downloaded (postgresql_embedded)")
    })
    .join()
    .map_err(|_| "the download thread panicked".to_string())?
}

#[cfg(not(feature = "download"))]
fn download_fallback(searched: Vec<String>) -> Result<Binaries, FindError> {
    Err(FindError::NotFound {
        searched: searched.join(", "),
        download: " (this build has no download fallback: rebuild with `--features download` to fetch binaries automatically)".into(),
    })
}

/// Per-machine cache: memory-mode templates and downloaded binaries.
pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("omni-gateway");
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from("/var/cache/omni-gateway");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/omni-gateway"),
        None => std::env::temp_dir().join("omni-gateway-cache"),
    }
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
    fn a_probe_is_remembered_until_the_binaries_change() {
        let dir = std::env::temp_dir().join(format!("omni-bin-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let postgres = dir.join("postgres");
        for exe in ["postgres", "initdb"] {
            std::fs::write(dir.join(exe), "#!/bin/sh\necho 'postgres (PostgreSQL) 15.1'\n").unwrap();
            std::fs::set_permissions(dir.join(exe), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let mut cache = Cache::default();
        assert_eq!(probe_cached(&dir, "test", &mut cache).unwrap().major, 15);
        assert!(cache.changed, "a new answer is to be saved");

        // A script that fails, with the same size and time: the stamp is the
        // same, so the answer comes from the cache without running it.
        let mtime = std::fs::metadata(&postgres).unwrap().modified().unwrap();
        std::fs::write(&postgres, "#!/bin/sh\nexit 1 # same length as before...\n").unwrap();
        std::fs::File::options().write(true).open(&postgres).unwrap().set_modified(mtime).unwrap();
        assert_eq!(std::fs::metadata(&postgres).unwrap().len(), "#!/bin/sh\necho 'postgres (PostgreSQL) 15.1'\n".len() as u64);
        assert_eq!(probe_cached(&dir, "test", &mut cache).unwrap().version, "postgres (PostgreSQL) 15.1");

        // Any change of size or time: probed again.
        std::fs::write(&postgres, "#!/bin/sh\nexit 1\n").unwrap();
        assert!(probe_cached(&dir, "test", &mut cache).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_search_label_can_be_read_back_from_the_cache() {
        for (_, how) in candidates() {
            assert!(FOUND_BY.contains(&how), "{how} is missing from FOUND_BY");
        }
    }

    #[test]
    fn explicit_dir_without_binaries_is_a_clear_error() {
        let err = find(Some(Path::new("/nonexistent/pg/bin"))).unwrap_err().to_string();
        assert!(err.contains("PGSERVE_BIN_DIR=/nonexistent/pg/bin"), "{err}");
        assert!(err.contains("postgres is missing"), "{err}");
    }
}
