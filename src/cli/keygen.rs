//! `keygen`: writes a private JWK and prints its public half.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::signing::{Algorithm, SigningKey, write_private_jwk};

#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// Signing algorithm: RS256 (what Cloud Endpoints verifies), ES256 or EdDSA.
    #[arg(long, value_enum)]
    pub alg: Algorithm,
    /// Key ID [default: the RFC 7638 thumbprint, as jose-util assigns].
    #[arg(long)]
    pub kid: Option<String>,
    /// File to write the private JWK to (created with mode 0600; an existing
    /// file is never replaced).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

pub(super) fn run(args: &KeygenArgs) -> anyhow::Result<()> {
    if args.kid.as_deref() == Some("") {
        anyhow::bail!("--kid must not be empty");
    }
    let (key, private_text) = SigningKey::generate(args.alg, args.kid.clone())?;
    write_private_jwk(&args.out, &private_text).with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("{}", serde_json::to_string(key.public_jwk())?);
    eprintln!(
        "wrote the private {} key {} to {} (mode 0600)",
        key.alg().as_str(),
        key.kid(),
        args.out.display()
    );
    Ok(())
}
