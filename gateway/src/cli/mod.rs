//! One-shot commands: `doctor` and `healthcheck`, `backup` (dumps, base
//! backups, drills), `restore`, `upgrade`, `import-sqlite`. A command runs to
//! its end and exits; it never supervises. It may import every layer below
//! it (`app` for shared file names, `pg`, `pitr`, `serve`, `worker`, ...).

pub mod archive;
pub mod backup;
pub mod doctor;
pub mod import;
pub mod restore;
pub mod upgrade;
