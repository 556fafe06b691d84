//! Where the product Omni replaces kept its SQLite database (SPEC §6).
//!
//! The gateway warns about one at start and `doctor` lists it; the worker
//! reports it at `GET /api/v1/migration/status`. Both look in the same places,
//! in the same order, relative to the directory Omni runs in.

use std::path::{Path, PathBuf};

/// Candidate paths, relative to the data root, in the order the old product looked.
pub const CANDIDATES: [&str; 4] = ["data/automagik-omni.db", "automagik-omni.db", "omni.db", "data/omni.db"];

/// Every candidate under `root` that is a file, in order.
pub fn find_all(root: &Path) -> Vec<PathBuf> {
    CANDIDATES.iter().map(|candidate| root.join(candidate)).filter(|path| path.is_file()).collect()
}

/// The first candidate under `root` that is a file.
pub fn find(root: &Path) -> Option<PathBuf> {
    find_all(root).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_candidates_in_order_and_ignores_directories() {
        let root = std::env::temp_dir().join(format!("omni-sqlite-{}", std::process::id()));
        std::fs::create_dir_all(root.join("data/omni.db")).unwrap();
        assert_eq!(find(&root), None, "a directory is not a database");
        std::fs::write(root.join("omni.db"), b"SQLite format 3\0").unwrap();
        std::fs::write(root.join("data/automagik-omni.db"), b"SQLite format 3\0").unwrap();
        assert_eq!(find_all(&root), vec![root.join("data/automagik-omni.db"), root.join("omni.db")]);
        std::fs::remove_dir_all(root).unwrap();
    }
}
