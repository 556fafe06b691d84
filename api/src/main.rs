//! `omni-api`: reads its settings from the environment (written there by the
//! gateway, or by hand), sets up logging, and runs the worker until
//! SIGTERM/SIGINT.

use std::process::ExitCode;

use omni_contract::{logging, worker_settings::WorkerSettings};

fn main() -> ExitCode {
    let settings = match WorkerSettings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("omni-api: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    logging::init(&settings.log_level, settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(omni_api::server::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
