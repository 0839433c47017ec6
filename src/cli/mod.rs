//! The subcommands: `serve` and the admin tools. Errors here are `anyhow`:
//! they end in a message to the operator and a non-zero exit code.

mod admin;
mod audit;
mod autojoin;
mod integration;
mod key;
mod keygen;
mod serve;

use clap::{Parser, Subcommand};

pub use self::audit::{AuditCommand, AuditListArgs};
pub use self::autojoin::{
    AutojoinCommand, CreateAutojoinKeyArgs, CreateOrgArgs, DeleteAutojoinKeyArgs, OrgRef, SetAutojoinExpiryArgs,
};
pub use self::integration::{IntegrationCommand, IntegrationCreateArgs, IntegrationListArgs, IntegrationRef};
pub use self::key::{KeyCommand, KeyRef, SetKeyExpiryArgs, SetTierArgs};
pub use self::keygen::KeygenArgs;
use crate::config::{MigrateArgs, OTHER_ENVIRONMENT, ServeArgs};
use crate::telemetry::LogFormat;

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.into_command() {
        Command::Serve(args) => serve::run(args).await,
        Command::Keygen(args) => keygen::run(&args),
        Command::Integration(IntegrationCommand::Create(args)) => integration::integration_create(&args).await,
        Command::Integration(IntegrationCommand::List(args)) => integration::integration_list(&args).await,
        Command::Integration(IntegrationCommand::Show(args)) => integration::integration_show(&args).await,
        Command::Integration(IntegrationCommand::Delete(args)) => integration::integration_delete(&args).await,
        Command::Key(command) => key::key(&command).await,
        Command::Migrate(args) => {
            admin::open(&args.store).await?;
            if matches!(
                crate::store::locate(&args.store.settings())?,
                crate::store::Location::Datastore { .. }
            ) {
                eprintln!("Datastore has no schema to migrate");
            } else {
                eprintln!("the store's schema is up to date");
            }
            Ok(())
        }
        Command::Autojoin(AutojoinCommand::CreateOrg(args)) => autojoin::autojoin_create_org(&args).await,
        Command::Autojoin(AutojoinCommand::CreateKey(args)) => autojoin::autojoin_create_key(&args).await,
        Command::Autojoin(AutojoinCommand::ListOrgs(args)) => autojoin::autojoin_list_orgs(&args).await,
        Command::Autojoin(AutojoinCommand::ListKeys(args)) => autojoin::autojoin_list_keys(&args).await,
        Command::Autojoin(AutojoinCommand::DeleteKey(args)) => autojoin::autojoin_delete_key(&args).await,
        Command::Autojoin(AutojoinCommand::DeleteOrg(args)) => autojoin::autojoin_delete_org(&args).await,
        Command::Autojoin(AutojoinCommand::SetExpiry(args)) => autojoin::autojoin_set_expiry(&args).await,
        Command::Audit(AuditCommand::List(args)) => audit::audit_list(&args).await,
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "token-exchange",
    version,
    about = "Exchanges API keys for short-lived signed JWTs",
    // Without a subcommand the binary serves, taking `serve`'s flags, as the
    // Go service's binary does: its deployments run it with no arguments
    // and configure it through the environment.
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log format [default: json for serve, text for serve --dev and admin commands].
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `token_exchange=debug,info`
    /// [default: RUST_LOG, else info for serve and warn for admin commands].
    #[arg(long, global = true, env = "LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

// Parsed once at start-up and matched once: boxing the large variant
// would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server.
    Serve(ServeArgs),
    /// Generate a private signing key (JWK) and print its public half.
    Keygen(KeygenArgs),
    /// Manage client integrations and their API keys.
    #[command(subcommand)]
    Integration(IntegrationCommand),
    /// Revoke, re-activate, re-tier, rotate or delete one integration key.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage autojoin organizations and their API keys.
    #[command(subcommand)]
    Autojoin(AutojoinCommand),
    /// Bring a SQL store's schema up to date, then exit (`serve` and every
    /// admin command also do this when they open the store).
    Migrate(MigrateArgs),
    /// Read the audit log of admin changes.
    #[command(subcommand)]
    Audit(AuditCommand),
}

impl Cli {
    /// The chosen subcommand; `serve` (with the top-level flags) when none
    /// is given.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

/// Every environment variable the binary reads: one per flag (any
/// subcommand's), and [`OTHER_ENVIRONMENT`].
pub fn environment_variables() -> std::collections::BTreeSet<String> {
    use clap::CommandFactory as _;
    fn walk(command: &clap::Command, out: &mut std::collections::BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(name) = arg.get_env() {
                out.insert(name.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out: std::collections::BTreeSet<String> = OTHER_ENVIRONMENT.iter().map(|s| (*s).to_owned()).collect();
    walk(&Cli::command(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::ListenAddress;
    use crate::config::DEFAULT_STORE;
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn store_settings_never_print_a_password() {
        let cli = Cli::try_parse_from([
            "token-exchange",
            "serve",
            "--store",
            "postgres://tx:hunter2@db.example:5432/keys",
        ])
        .unwrap();
        let text = format!("{cli:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("PostgreSQL database keys on db.example:5432"), "{text}");
    }

    #[test]
    fn no_subcommand_means_serve_as_the_go_binary_does() {
        let cli = Cli::try_parse_from(["token-exchange", "--port", "9001", "--dev"]).unwrap();
        let Command::Serve(args) = cli.into_command() else {
            panic!("not serve")
        };
        assert_eq!(args.port, 9001);
        assert!(args.dev);
        // Server flags do not mix with an admin subcommand.
        assert!(Cli::try_parse_from(["token-exchange", "--dev", "keygen", "--alg", "RS256", "--out", "x"]).is_err());
    }

    #[test]
    fn flags_have_their_defaults() {
        let cli = Cli::try_parse_from(["token-exchange", "serve"]).unwrap();
        let Command::Serve(args) = cli.into_command() else {
            panic!("not serve")
        };
        // Defaults only hold when the environment does not set them.
        if std::env::var_os("PORT").is_none() {
            assert_eq!(args.port, 8080);
        }
        if std::env::var_os("STORE").is_none() {
            assert_eq!(args.store.store_url(), DEFAULT_STORE);
        }
        let cli = Cli::try_parse_from(["token-exchange", "serve", "--port", "9000", "--dev"]).unwrap();
        let Command::Serve(args) = cli.into_command() else {
            panic!("not serve")
        };
        assert_eq!(args.listen_addr(), ListenAddress::Exact("127.0.0.1:9000".into()));
    }
}
