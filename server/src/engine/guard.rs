//! What keeps one guest from passing for another: its TAP carries only its own MAC and addresses
//! (`network::nft`, installed when the VM gets its TAP, removed when it lets it go), and its SSH host key,
//! learned over its guest channel, is pinned in banger's known_hosts (`ssh_config`) for `<name>.vm` and its
//! address, and forgotten when the VM is deleted.
use std::sync::Arc;
use std::time::Duration;

use tools_schema::guest::{GuestRequest, GuestResponse, SSH_HOST_KEY_WAIT_MAX_MS};
use tools_schema::ApiError;

use super::Engine;
use crate::guest::GuestConn;
use crate::store::VmRow;

impl Engine {
    /// Lets `tap` carry `row`'s traffic, and only that. Before this a TAP carries nothing.
    pub(crate) async fn guard_tap(&self, row: &VmRow, tap: &str) -> Result<(), ApiError> {
        let (Some(net), Some(ip), Some(mac)) = (self.network(), row.ip, row.mac.as_deref()) else { return Ok(()) };
        net.guard_tap(tap, mac, ip, row.nat).await.map_err(|e| {
            ApiError::new(tools_schema::ErrorCode::HostUnsupported, format!("cannot filter VM {}'s TAP: {e}", row.name))
                .with_hint("bridge-family nftables rules need the nf_tables_bridge module")
                .with_next("doctor.run", serde_json::json!({}), "checks nftables")
        })
    }

    /// The TAP's rules go before the TAP goes back to the pool, where it carries nothing.
    pub(crate) async fn unguard_tap(&self, row: &VmRow, tap: &str) {
        if let Some(net) = self.network() {
            if let Err(e) = net.unguard_tap(tap, row.ip).await {
                tracing::warn!(vm = %row.name, %tap, error = %e, "cannot remove the TAP's filter");
            }
        }
    }

    fn known_hosts(&self) -> std::path::PathBuf {
        crate::ssh_config::known_hosts_path(&self.cfg.state_dir)
    }

    /// Asks a VM that just became ready for its SSH host key (its agent waits until sshd's key is made) and
    /// pins it; in the background, because SSH never delays readiness. A guest that answers nothing valid
    /// gets no pin, so ssh to it fails host-key verification instead of trusting whoever answers.
    pub(crate) fn learn_host_key_later(&self, row: &VmRow, conn: Arc<GuestConn>) {
        let (name, ip, path) = (row.name.clone(), row.ip, self.known_hosts());
        tokio::spawn(async move {
            let ask = GuestRequest::SshHostKey { wait_ms: SSH_HOST_KEY_WAIT_MAX_MS };
            let wait = Duration::from_millis(SSH_HOST_KEY_WAIT_MAX_MS) + Duration::from_secs(10);
            // No caller to cancel it: the deadline bounds it, and a closed channel ends it at once.
            let reported = match conn.request(&ask, wait, &tokio_util::sync::CancellationToken::new()).await {
                Ok(GuestResponse::SshHostKey { public_key }) => public_key,
                Err(crate::guest::GuestError::Agent { message, .. }) => {
                    tracing::warn!(vm = %name, error = %message, "no SSH host key to pin");
                    return;
                }
                Ok(_) => {
                    tracing::warn!(vm = %name, "unexpected answer to SshHostKey; no host key pinned");
                    return;
                }
                Err(e) => {
                    tracing::debug!(vm = %name, error = %e, "no SSH host key learned");
                    return;
                }
            };
            if conn.is_closed() {
                return; // stopped or deleted meanwhile: its entries are gone, or will be replaced at its next boot
            }
            let key = match crate::ssh_config::parse_host_key(&reported) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "refused the SSH host key the guest reported");
                    return;
                }
            };
            let pinned = tokio::task::spawn_blocking(move || crate::ssh_config::pin_host_key(&path, &name, ip, &key));
            match pinned.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the managed known_hosts"),
                Err(e) => tracing::warn!(error = %e, "known_hosts task"),
            }
        });
    }

    /// A deleted VM's pinned host key must not vouch for whatever gets its name or address next.
    pub(crate) fn forget_host_key(&self, row: &VmRow) {
        if let Err(e) = crate::ssh_config::forget_host_key(&self.known_hosts(), &row.name, row.ip) {
            tracing::warn!(vm = %row.name, error = %e, "cannot remove the VM's pinned SSH host key");
        }
    }

    /// At daemon start: only VMs that exist keep pinned keys, for the name and address they have.
    pub async fn prune_host_keys(&self) {
        let vms: Vec<(String, Option<std::net::Ipv4Addr>)> =
            self.store.vms().await.unwrap_or_default().into_iter().map(|v| (v.name, v.ip)).collect();
        if let Err(e) = crate::ssh_config::retain_host_keys(&self.known_hosts(), &vms) {
            tracing::warn!(error = %e, "cannot prune the managed known_hosts");
        }
    }
}
