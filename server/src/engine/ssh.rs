//! SSH readiness: waiting until a guest's sshd answers and its host key is pinned (`vm.ssh`, and `vm.run`'s
//! `sshd` stage), so `ssh` right after a create works. The options ssh gets are `tools_schema::ssh`'s.
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tools_schema::vm::{VmRef, VmSshInfo, VmState};
use tools_schema::{ApiError, ErrorCode};

use super::{CallContext, Engine};

/// How long the daemon waits for a fresh guest's sshd and host-key pin before answering without them (ssh
/// then says what is wrong; the VM is still good for exec, sessions and workspaces).
const SSH_READY_WAIT: Duration = Duration::from_secs(30);

impl Engine {
    pub async fn vm_ssh(self: &Arc<Self>, p: VmRef, ctx: CallContext) -> Result<VmSshInfo, ApiError> {
        let row = self.resolve_vm(&p.vm).await?;
        if row.state != VmState::Running {
            return Err(ApiError::precondition(format!("VM {} is {}", row.name, row.state.as_str()))
                .with_hint("ssh needs a running VM")
                .with_next("vm.start", serde_json::json!({"vm": row.name}), "starts it"));
        }
        let ip = row.ip.ok_or_else(|| {
            ApiError::precondition(format!("VM {} has no network address", row.name))
                .with_hint("networking is disabled in the daemon's config; use vm_exec instead")
        })?;
        let ready = self.wait_ssh_ready(&row.name, ip, &ctx.cancel).await?;
        let known_hosts = crate::ssh_config::known_hosts_path(&self.cfg.state_dir);
        let options = tools_schema::ssh::client_options(&self.cfg.ssh_key(), &known_hosts)
            .into_iter()
            .map(|(option, value)| format!("{option}={value}"))
            .collect();
        Ok(VmSshInfo { dns_name: format!("{}.vm", row.name), vm: row.name, host: ip.to_string(), ready, options })
    }

    /// Waits until the guest's sshd greets on port 22 and the daemon has pinned its host key (learned in the
    /// background once the VM is ready). Returns whether both happened within `SSH_READY_WAIT`. Reads at most
    /// 4 bytes from the guest, each connect and read under its own deadline; a cancel ends the wait.
    pub(crate) async fn wait_ssh_ready(
        &self,
        vm: &str,
        ip: Ipv4Addr,
        cancel: &CancellationToken,
    ) -> Result<bool, ApiError> {
        let deadline = Instant::now() + SSH_READY_WAIT;
        let known_hosts = crate::ssh_config::known_hosts_path(&self.cfg.state_dir);
        let ready = async {
            while !sshd_greets(ip).await {
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            loop {
                let (path, name) = (known_hosts.clone(), vm.to_string());
                let pinned = tokio::task::spawn_blocking(move || crate::ssh_config::is_pinned(&path, &name, ip));
                if pinned.await.unwrap_or(false) {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            ready = ready => {
                if !ready {
                    tracing::warn!(%vm, "sshd did not answer or no host key was pinned in time");
                }
                Ok(ready)
            }
            _ = cancel.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, format!("waiting for {vm}'s sshd was cancelled")).with_hint("nothing changed in the VM").with_next("vm.ssh", serde_json::json!({"vm": vm}), "waits for it again")),
        }
    }
}

/// Whether an SSH server greets at `ip:22` (its first 4 bytes are `SSH-`), within 3 s.
async fn sshd_greets(ip: Ipv4Addr) -> bool {
    use tokio::io::AsyncReadExt;
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect((ip, 22)).await.ok()?;
        let mut greeting = [0u8; 4];
        s.read_exact(&mut greeting).await.ok()?;
        Some(&greeting == b"SSH-")
    };
    matches!(tokio::time::timeout(Duration::from_secs(3), attempt).await, Ok(Some(true)))
}
