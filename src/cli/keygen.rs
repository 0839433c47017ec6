//! `keygen`: writes a private JWK and prints its public half.

use anyhow::Context as _;

use crate::config::KeygenArgs;
use crate::signing::{SigningKey, write_private_jwk};

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
