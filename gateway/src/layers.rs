//! The layering of `gateway/src`, checked: every top-level module imports
//! only modules of the layers below it, so no two of them import each other.
//! The table in `lib.rs` and ARCHITECTURE.md's code map say the same.
//!
//! Imports are read from the source text (`crate::name`, and the names of
//! `crate::{a, b::c}`), comments left out, which is what `use` and paths in
//! code look like in this crate; `main.rs` (the binary) sits above them all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom. A module may import any module after it, none before it.
const LAYERS: &[&str] = &["cli", "app", "worker", "serve", "relay", "repository", "pitr", "pg", "supervise", "status", "process", "tls", "config"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules found in `src/`: folders and files but `lib.rs`,
/// `main.rs` and the test-only ones (this test, `testing.rs`: no product code).
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            found.insert(name, rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && !["lib", "main", "layers", "testing"].contains(&name.as_str()) {
            found.insert(name, vec![path]);
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level names a source text reaches through `crate::`.
fn crate_names(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `omni_contract::…` and the like
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the first name of each top-level item.
            let (mut depth, mut item_start) = (0usize, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphabetic() || c == '_') => {
                        names.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names
}

fn ident(text: &str) -> String {
    text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// Module → (imported module → the files that import it).
fn imports() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let modules = modules();
    let mut graph = BTreeMap::new();
    for (name, files) in &modules {
        let edges: &mut BTreeMap<String, BTreeSet<String>> = graph.entry(name.clone()).or_default();
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            for target in crate_names(&text) {
                if &target != name && modules.contains_key(&target) {
                    let shown = file.strip_prefix(src()).unwrap().display().to_string();
                    edges.entry(target).or_default().insert(shown);
                }
            }
        }
    }
    graph
}

#[test]
fn every_top_level_module_has_a_layer() {
    let modules: BTreeSet<String> = modules().into_keys().collect();
    let listed: BTreeSet<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        modules, listed,
        "gateway/src's top-level modules and the LAYERS table differ: place a new module in a layer (here, in lib.rs and in ARCHITECTURE.md)"
    );
}

#[test]
fn layers_import_only_downwards() {
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong = Vec::new();
    for (from, edges) in imports() {
        for (to, files) in edges {
            if let (Some(a), Some(b)) = (rank(&from), rank(&to)) {
                if b < a {
                    wrong.push(format!("{from} → {to} (a layer above it), in {}", files.into_iter().collect::<Vec<_>>().join(", ")));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports that run upwards (each is half of a possible cycle):\n{}", wrong.join("\n"));
}

#[test]
fn layers_have_no_cycles() {
    let graph = imports();
    // Depth-first search; a node met again while on the path closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            cycles.push(cycle.join(" → "));
            return;
        }
        if !done.insert(node.to_string()) {
            return;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            visit(next, graph, path, done, cycles);
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles between top-level modules of gateway/src:\n{}", cycles.join("\n"));
}

#[test]
fn the_reader_sees_grouped_and_plain_imports() {
    let names = crate_names("use crate::{a::{b, c}, d};\nuse crate::e::F;\n// crate::g\nomni_contract::h; my_crate::i");
    assert_eq!(names, ["a", "d", "e"].iter().map(|s| s.to_string()).collect());
}
