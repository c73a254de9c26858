//! `erlmail import`: load what contrib/erlmail-export.escript wrote from ErlMail's Mnesia
//! into the store (and the Maildirs, when the configuration keeps them). The work itself
//! is `erlmail::import`; this file only opens the store and prints the report.

use std::io::IsTerminal;
use std::path::Path;

use erlmail::config::Config;

use super::with_store;

pub(super) fn run(config: &Config, file: &Path) -> anyhow::Result<()> {
    // The messages also go into the Maildirs when the configuration keeps them.
    let maildir_root = config.maildir_root.clone();
    with_store(config, |store| async move {
        let report = erlmail::import::import(
            &*store,
            file,
            maildir_root.as_deref(),
            std::io::stderr().is_terminal(),
        )
        .await?;
        println!("{report}");
        Ok(())
    })
}
