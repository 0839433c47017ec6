use std::process::ExitCode;

use clap::Parser as _;
use token_exchange::cli::{Cli, Command};
use token_exchange::telemetry::{self, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs JSON at info for log pipelines, but text for someone
    // trying it with --dev; admin commands print their results on stdout
    // and keep a human-readable log to warnings.
    let (default_format, default_level) = match &cli.command {
        None if cli.serve.dev => (LogFormat::Text, "info"),
        Some(Command::Serve(args)) if args.dev => (LogFormat::Text, "info"),
        None | Some(Command::Serve(_)) => (LogFormat::Json, "info"),
        Some(_) => (LogFormat::Text, "warn"),
    };
    let format = cli.log_format.unwrap_or(default_format);
    if let Err(e) = telemetry::init(format, cli.log_level.as_deref(), default_level) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }

    match token_exchange::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
