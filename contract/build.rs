//! Embeds `migrations/NNNN_name.sql` into `omni-contract` at compile time
//! (the worker applies them; the gateway bakes them into its memory-mode template).
//!
//! The list is generated rather than written by hand so a new file in
//! `migrations/` cannot be forgotten, and a badly named one fails the build
//! instead of being skipped at run time.

use std::{env, fs, path::Path};

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    println!("cargo:rerun-if-changed={}", dir.display());

    let mut entries: Vec<(u32, String)> = Vec::new();
    for entry in fs::read_dir(&dir).expect("migrations/ directory is readable") {
        let entry = entry.expect("migrations/ entry is readable");
        let name = entry.file_name().into_string().expect("migration file names are UTF-8");
        println!("cargo:rerun-if-changed={}", entry.path().display());
        let Some(stem) = name.strip_suffix(".sql") else { continue };
        let (number, label) = stem
            .split_once('_')
            .unwrap_or_else(|| panic!("migration {name}: expected NNNN_name.sql"));
        let valid_label =
            !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if number.len() != 4 || !number.bytes().all(|b| b.is_ascii_digit()) || !valid_label {
            panic!("migration {name}: expected NNNN_name.sql (four digits, then letters, digits, _)");
        }
        entries.push((number.parse().unwrap(), name));
    }
    entries.sort();
    for pair in entries.windows(2) {
        if pair[0].0 == pair[1].0 {
            panic!("migrations {} and {} share a version number", pair[0].1, pair[1].1);
        }
    }

    let mut code = String::from("&[\n");
    for (version, name) in &entries {
        let path = dir.join(name);
        code.push_str(&format!(
            "    Migration {{ version: {version}, name: {name:?}, sql: include_str!({:?}) }},\n",
            path.display().to_string()
        ));
    }
    code.push_str("]\n");
    let out = Path::new(&env::var("OUT_DIR").unwrap()).join("migrations.rs");
    fs::write(out, code).expect("write generated migration list");
}
