//! The UI (`ui-dist/`) is compiled into omni-api (`static_files::BuiltIn`):
//! rebuild when a file there is added, removed or changed.
fn main() {
    println!("cargo:rerun-if-changed=../ui-dist");
}
