//! `erlmail config`: check a configuration as `serve` would read it, or convert one
//! (ErlMail's `.app` or sys.config too) to erlmail YAML. It touches no store or port.

use std::path::PathBuf;

use erlmail::auth::sign::Signers;

use super::ConfigSource;

#[derive(clap::Subcommand, Debug)]
pub(super) enum ConfigCmd {
    /// Print the effective configuration (or the error, with file, line and column).
    Check {
        /// The file to check (default: the one `--config` names).
        file: Option<PathBuf>,
    },
    /// Print an ErlMail (or erlmail) file as erlmail YAML.
    Convert {
        /// The file to convert.
        file: PathBuf,
    },
}

pub(super) fn run(source: &ConfigSource, action: ConfigCmd) -> anyhow::Result<()> {
    let config = match action {
        ConfigCmd::Check { file } => {
            let config = source.load_file(file.as_deref().or(source.path.as_deref()))?;
            // The keys are part of the configuration: `serve` would refuse them too.
            Signers::load(&config)?;
            for key in &config.ignored_keys {
                eprintln!("note: {key} is accepted and ignored (erlmail does not serve it)");
            }
            config
        }
        ConfigCmd::Convert { file } => source.load_file(Some(&file))?,
    };
    print!("{}", config.to_yaml());
    Ok(())
}
