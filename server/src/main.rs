//! bangerd: the banger daemon. Runs in the foreground; `banger daemon start` or the systemd unit
//! (`banger daemon unit`) run it in the background.
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "bangerd", version = env!("CARGO_PKG_VERSION"), about = "The banger daemon: owns every VM, image and guest session on this host")]
struct Args {
    /// Config file (default: /etc/banger/config.toml as root, $XDG_CONFIG_HOME/banger/config.toml otherwise).
    #[arg(long, env = "BANGER_CONFIG")]
    config: Option<PathBuf>,
    /// Log level or env-filter directive; overrides the config file.
    #[arg(long, env = "BANGER_LOG")]
    log_level: Option<String>,
    /// Log format on stderr: json or text; overrides the config file.
    #[arg(long)]
    log_format: Option<String>,
    /// Print the build (version, commit, build time) and exit.
    #[arg(long)]
    build_info: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.build_info {
        println!("{}", serde_json::to_string(&tools_schema::BuildInfo::current())?);
        return Ok(());
    }
    let mut cfg = banger_server::Config::load(args.config.as_deref())?;
    if let Some(l) = args.log_level {
        cfg.log_level = l;
    }
    if let Some(f) = args.log_format {
        cfg.log_format = f;
        cfg.validate()?;
    }
    // Private before the log file is opened in it.
    banger_server::daemon::prepare_state_dir(&cfg)?;
    banger_server::logging::init(&cfg.log_level, &cfg.log_format, Some(&cfg.log_file()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(banger_server::daemon::run(cfg))
        .inspect_err(|e| tracing::error!(error = format!("{e:#}"), "bangerd failed"))
}
