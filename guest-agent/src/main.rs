//! banger-agent: runs inside every banger guest and answers the daemon over the host-guest channel.
//!
//! `banger-agent init` is PID 1 (the initramfs hands over to it): it mounts the pseudo filesystems, sets
//! the hostname, then supervises `banger-agent serve` and reaps orphans. The split keeps PID 1's
//! `waitpid(-1)` from stealing the exit statuses the server needs for the commands it runs.
//! `banger-agent serve` speaks the guest protocol (tools_schema::guest) and can also run as an ordinary
//! service under another init.
mod channel;
mod exec;
mod files;
mod identity;
mod init;
mod ports;
mod serve;
mod session;

fn main() -> anyhow::Result<()> {
    // Booted without an initramfs, the kernel starts `init=/usr/local/bin/banger-agent` with no arguments.
    let mode =
        std::env::args().nth(1).unwrap_or_else(|| if std::process::id() == 1 { "init".into() } else { String::new() });
    match mode.as_str() {
        "init" => init::run(),
        "serve" => serve::run(),
        // Started by init: authorises banger's key, makes the host key, starts sshd.
        "ssh-setup" => identity::start_sshd(std::env::var("BANGER_SSH_KEY").ok().as_deref(), false),
        "version" | "--version" => {
            println!("banger-agent {}", tools_schema::BuildInfo::current());
            Ok(())
        }
        _ => {
            eprintln!("usage: banger-agent init|serve|version");
            std::process::exit(2);
        }
    }
}
