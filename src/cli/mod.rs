//! The subcommands: `serve` and the admin tools. Errors here are `anyhow`:
//! they end in a message to the operator and a non-zero exit code.

mod admin;
mod keygen;
mod lifecycle;
mod serve;

use crate::config::{AuditCommand, AutojoinCommand, Cli, Command, IntegrationCommand};

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.into_command() {
        Command::Serve(args) => serve::run(args).await,
        Command::Keygen(args) => keygen::run(&args),
        Command::Integration(IntegrationCommand::Create(args)) => admin::integration_create(&args).await,
        Command::Integration(IntegrationCommand::List(args)) => lifecycle::integration_list(&args).await,
        Command::Integration(IntegrationCommand::Show(args)) => lifecycle::integration_show(&args).await,
        Command::Integration(IntegrationCommand::Delete(args)) => lifecycle::integration_delete(&args).await,
        Command::Key(command) => lifecycle::key(&command).await,
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
        Command::Autojoin(AutojoinCommand::CreateOrg(args)) => admin::autojoin_create_org(&args).await,
        Command::Autojoin(AutojoinCommand::CreateKey(args)) => admin::autojoin_create_key(&args).await,
        Command::Autojoin(AutojoinCommand::ListOrgs(args)) => lifecycle::autojoin_list_orgs(&args).await,
        Command::Autojoin(AutojoinCommand::ListKeys(args)) => lifecycle::autojoin_list_keys(&args).await,
        Command::Autojoin(AutojoinCommand::DeleteKey(args)) => lifecycle::autojoin_delete_key(&args).await,
        Command::Autojoin(AutojoinCommand::DeleteOrg(args)) => lifecycle::autojoin_delete_org(&args).await,
        Command::Autojoin(AutojoinCommand::SetExpiry(args)) => lifecycle::autojoin_set_expiry(&args).await,
        Command::Audit(AuditCommand::List(args)) => lifecycle::audit_list(&args).await,
    }
}
