//! Relative paths in settings are resolved once, against the working
//! directory at start, so nothing later depends on it and logs show exactly
//! which directory is meant.

use std::path::{Component, Path, PathBuf};

/// Joins `p` onto `base` when relative and removes `.` and `..` components,
/// without touching the filesystem (the path may not exist yet).
pub fn absolute(base: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_against_the_base_and_normalises() {
        assert_eq!(absolute(Path::new("/srv/omni"), Path::new("./data/postgres")), PathBuf::from("/srv/omni/data/postgres"));
        assert_eq!(absolute(Path::new("/srv/omni"), Path::new("../x/./y")), PathBuf::from("/srv/x/y"));
        assert_eq!(absolute(Path::new("/srv/omni"), Path::new("/var/lib/omni")), PathBuf::from("/var/lib/omni"));
        assert_eq!(absolute(Path::new("/srv/omni"), Path::new(".")), PathBuf::from("/srv/omni"));
    }
}
