//! `erlmail dkim keygen`: make a DKIM signing key, write it where `serve` can read it
//! (mode 0600, never over an existing file), and print the DNS record and the
//! configuration line that put it to use. It changes no running daemon.

use std::path::PathBuf;

use anyhow::Context;

use erlmail::auth::sign::{generate, write_private_key, KeyKind};

use super::ConfigSource;

#[derive(clap::Subcommand, Debug)]
pub(super) enum DkimCmd {
    /// Make a signing key for DOMAIN under SELECTOR (RSA 2048 unless --ed25519), write it
    /// (mode 0600, never over an existing file) and print the DNS TXT record to publish.
    Keygen {
        /// The signing domain (`d=`): mail from it and its subdomains is signed.
        domain: String,
        /// The selector (`s=`): the record goes at SELECTOR._domainkey.DOMAIN.
        selector: String,
        /// An Ed25519 key (ed25519-sha256, RFC 8463) instead of RSA.
        #[arg(long)]
        ed25519: bool,
        /// The private key file (default: <spool_dir>/dkim/DOMAIN.SELECTOR.pem).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub(super) fn run(source: &ConfigSource, action: DkimCmd) -> anyhow::Result<()> {
    let DkimCmd::Keygen {
        domain,
        selector,
        ed25519,
        out,
    } = action;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let kind = if ed25519 {
        KeyKind::Ed25519
    } else {
        KeyKind::Rsa
    };
    // Checked before the configuration is read or a directory made.
    let key = generate(kind, &domain, &selector)?;
    let out = match out {
        Some(p) => p,
        None => {
            let dir = source.load()?.spool_dir.join("dkim");
            // 0700 like every directory erlmail makes (the umask set in main).
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.join(format!("{domain}.{selector}.pem"))
        }
    };
    write_private_key(&out, &key.pem)
        .with_context(|| format!("cannot write the private key to {}", out.display()))?;
    // Absolute, so that the configuration line works whatever directory serve runs in.
    let out = std::fs::canonicalize(&out).unwrap_or(out);
    println!("Private key written to {} (mode 0600).", out.display());
    println!();
    println!("Publish this TXT record in the DNS zone of {domain}:");
    println!("{}", key.zone_line());
    println!();
    println!("Its text as one string (for DNS providers' web forms):");
    println!("{}", key.record);
    println!();
    println!("Then add to the configuration and reload (SIGHUP):");
    println!(
        "server_smtp_dkim_keys: [{{domain: {domain}, selector: {selector}, private_key: {:?}}}]",
        out.display().to_string()
    );
    Ok(())
}
