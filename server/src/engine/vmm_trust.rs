//! Which VMM the daemon trusts with new VMs, and the boot self-test that earns that trust.
//!
//! Firecracker is the better VMM on hardware KVM, but a VMM that has never booted a guest on this host is
//! not trusted with the user's first VM: until a boot self-test with the current banger build, kernel and
//! Firecracker binary has passed (recorded in the store, keyed by those inputs), new VMs run under QEMU
//! with KVM. The self-test runs in the background at most once per daemon start, never delaying a create,
//! and again whenever its inputs change. `doctor.run` with `boot: true` runs the same test on every VMM the
//! host can run and reports each.
use std::sync::Arc;
use std::time::Instant;

use tools_schema::daemon::{Acceleration, BootCheck, CheckStatus, VmmChoice, VmmKind};
use tools_schema::vm::{BootRequest, VmCreateParams, VmExecParams, VmRefs};
use tools_schema::BuildInfo;

use super::warm::FileStamp;
use super::{CallContext, Engine};
use crate::host::{choose_vmm, firecracker_unrunnable, FirecrackerProof};

/// What the guest of a boot self-test must print: proves a command really ran there.
const SELF_TEST_SCRIPT: &str = "echo banger-self-test-$((6 * 7)); uname -r";
const SELF_TEST_EXPECT: &str = "banger-self-test-42";

impl Engine {
    /// The VMM new VMs get, and why (it can change once while the daemon runs: when Firecracker's boot
    /// self-test passes).
    pub fn vmm(&self) -> VmmChoice {
        self.vmm.read().clone()
    }

    /// The driver of one VMM, set up for this host and config: the engine's only way to a VMM.
    pub(crate) fn driver(&self, kind: VmmKind) -> crate::vmm::Driver {
        crate::vmm::Driver::new(
            kind,
            &crate::vmm::DriverSettings {
                tools: self.cfg.tools(),
                qemu_accel: self.vmm().qemu_accel,
                qemu_vsock: self.cfg.qemu_channel == tools_schema::boot::ChannelKind::Vsock,
                qemu_root_layout: self.cfg.qemu_root_layout,
            },
        )
    }

    fn set_firecracker_proof(&self, proof: &FirecrackerProof) -> VmmChoice {
        let choice = choose_vmm(self.cfg.vmm, self.accel, proof);
        *self.vmm.write() = choice.clone();
        choice
    }

    /// What a Firecracker proof is keyed by: this banger build, the default image's ELF kernel and the
    /// Firecracker binary. None when one of them is missing (then there is nothing to prove yet).
    async fn firecracker_proof_inputs(&self) -> Option<String> {
        let binary = self.cfg.find_binary("firecracker")?;
        let images = self.store.images().await.ok()?;
        let kernel = images.iter().find(|i| i.is_default)?.kernel_elf.clone()?;
        let b = BuildInfo::current();
        let stamps = (
            format!("{}+{}", b.version, b.commit),
            FileStamp::of(std::path::Path::new(&kernel)).ok()?,
            FileStamp::of(&binary).ok()?,
        );
        serde_json::to_string(&stamps).ok()
    }

    /// At start-up: on a hardware-KVM host with Firecracker installed and no VMM forced by the config, look
    /// up whether Firecracker was proven with the current inputs; if it never was, prove it in the
    /// background (once per daemon start) and switch new VMs to it when it passes.
    pub async fn settle_vmm_choice(self: &Arc<Self>) {
        if self.cfg.vmm.is_some() || self.accel != Acceleration::HardwareKvm {
            return;
        }
        let Some(inputs) = self.firecracker_proof_inputs().await else { return };
        match self.store.vmm_proof(VmmKind::Firecracker, inputs.clone()).await {
            Ok(Some(proof)) => {
                let proof =
                    if proof.passed { FirecrackerProof::Passed } else { FirecrackerProof::Failed(proof.detail) };
                let choice = self.set_firecracker_proof(&proof);
                tracing::info!(vmm = choice.vmm.as_str(), reason = %choice.reason, "VMM choice from an earlier self-test");
            }
            Ok(None) => {
                let engine = self.clone();
                tokio::spawn(async move {
                    tracing::info!("proving Firecracker on this host: booting a throwaway guest in the background");
                    let check = engine.boot_self_test(VmmKind::Firecracker).await;
                    engine.record_firecracker_proof(&inputs, &check).await;
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot read earlier VMM self-tests; QEMU stays the VMM"),
        }
    }

    /// Stores a Firecracker self-test's outcome under its inputs and applies it to the VMM choice. A VMM
    /// switch empties the warm pool (its VMs run on the old VMM) and refills it on the new one.
    async fn record_firecracker_proof(self: &Arc<Self>, inputs: &str, check: &BootCheck) {
        let passed = check.status == CheckStatus::Pass;
        if let Err(e) =
            self.store.record_vmm_proof(VmmKind::Firecracker, inputs.to_string(), passed, check.detail.clone()).await
        {
            tracing::warn!(error = %e, "cannot record the Firecracker self-test");
        }
        if self.cfg.vmm.is_some() || self.accel != Acceleration::HardwareKvm {
            return;
        }
        let before = self.vmm().vmm;
        let proof = if passed { FirecrackerProof::Passed } else { FirecrackerProof::Failed(check.detail.clone()) };
        let choice = self.set_firecracker_proof(&proof);
        tracing::info!(passed, vmm = choice.vmm.as_str(), reason = %choice.reason, "Firecracker self-test finished");
        if choice.vmm != before {
            self.drain_pool().await;
            self.refill_pool_later();
        }
    }

    /// doctor.run's boot self-tests: QEMU always, Firecracker where it can run (else why not).
    pub(crate) async fn doctor_boots(self: &Arc<Self>) -> Vec<BootCheck> {
        let mut checks = vec![self.boot_self_test(VmmKind::Qemu).await];
        match firecracker_unrunnable(&self.cfg, self.accel) {
            Some(why) => checks.push(BootCheck {
                vmm: VmmKind::Firecracker,
                status: CheckStatus::Warn,
                tried: false,
                ready_ms: None,
                detail: why,
                logs: None,
            }),
            None => {
                let check = self.boot_self_test(VmmKind::Firecracker).await;
                if let Some(inputs) = self.firecracker_proof_inputs().await {
                    self.record_firecracker_proof(&inputs, &check).await;
                }
                checks.push(check);
            }
        }
        checks
    }

    /// Boots a throwaway guest cold on `vmm`, runs a command in it and deletes it. It runs in a task of its
    /// own, so a caller that goes away cannot stop it between create and delete: nothing it makes outlives it.
    pub(crate) async fn boot_self_test(self: &Arc<Self>, vmm: VmmKind) -> BootCheck {
        let engine = self.clone();
        tokio::spawn(async move { engine.boot_self_test_inner(vmm).await }).await.unwrap_or_else(|e| BootCheck {
            vmm,
            status: CheckStatus::Fail,
            tried: true,
            ready_ms: None,
            detail: format!("the self-test task failed: {e}"),
            logs: None,
        })
    }

    async fn boot_self_test_inner(self: Arc<Self>, vmm: VmmKind) -> BootCheck {
        let name = format!("self-test-{}-{}", vmm.as_str(), &super::new_id()[..6]);
        let started = Instant::now();
        let params = VmCreateParams {
            name: Some(name.clone()),
            vmm: Some(vmm),
            boot: Some(BootRequest::Cold),
            ..Default::default()
        };
        let created = self.vm_create(params, CallContext::default()).await;
        let ready_ms = started.elapsed().as_millis() as u64;
        let fail = |detail: String, logs: Option<String>| BootCheck {
            vmm,
            status: CheckStatus::Fail,
            tried: true,
            ready_ms: None,
            detail,
            logs,
        };
        let mut check = match created {
            Err(e) => fail(format!("the guest did not boot: {}", e.message), e.hint),
            Ok(_) => {
                let exec = VmExecParams {
                    vm: name.clone(),
                    command: vec!["sh".into(), "-c".into(), SELF_TEST_SCRIPT.into()],
                    env: Default::default(),
                    cwd: None,
                    stdin: None,
                    timeout_secs: Some(60),
                    max_inline_bytes: None,
                };
                match self.vm_exec(exec, CallContext::default()).await {
                    Ok(r) if r.exit_code == Some(0) && r.stdout.contains(SELF_TEST_EXPECT) => BootCheck {
                        vmm,
                        status: CheckStatus::Pass,
                        tried: true,
                        ready_ms: Some(ready_ms),
                        detail: format!(
                            "booted a guest cold (kernel {}) and ran a command in it; ready in {ready_ms} ms",
                            r.stdout.lines().nth(1).unwrap_or("?").trim()
                        ),
                        logs: None,
                    },
                    Ok(r) => fail(
                        format!(
                            "the guest booted but the command went wrong (exit {:?}, signal {:?})",
                            r.exit_code, r.signal
                        ),
                        Some(format!("stdout: {}\nstderr: {}", r.stdout.trim(), r.stderr.trim())),
                    ),
                    Err(e) => fail(format!("the guest booted but running a command failed: {}", e.message), e.hint),
                }
            }
        };
        // Delete on every path. A create that failed rolled itself back, so there is nothing to find.
        let deleted = self.vm_delete(VmRefs { vm: name.clone().into() }, CallContext::default()).await;
        let leftover = match deleted {
            Ok(r) => {
                r.results.into_iter().find_map(|o| o.error).filter(|e| e.code != tools_schema::ErrorCode::NotFound)
            }
            Err(e) if e.code == tools_schema::ErrorCode::NotFound => None,
            Err(e) => Some(e),
        };
        if let Some(e) = leftover {
            check.status = CheckStatus::Fail;
            check.detail = format!("{}; deleting the self-test VM {name} failed: {}", check.detail, e.message);
        }
        tracing::info!(vmm = vmm.as_str(), status = ?check.status, ready_ms, "boot self-test finished");
        check
    }
}

#[cfg(test)]
mod tests {
    /// What differs between VMMs lives in `vmm::Driver`: no file of the engine branches on which VMM a VM
    /// runs on. Naming a VMM (a self-test of Firecracker, a proof keyed by it) is fine; comparing or matching
    /// one is not.
    /// A comparison, a match arm or a pattern on a `VmmKind` (comments aside). A `match` arm names the
    /// variant, so a `match vm.vmm { .. }` is caught on its arms.
    fn branches_on_vmm_kind(line: &str) -> bool {
        let code = line.split("//").next().unwrap_or_default();
        code.contains("VmmKind") && ["==", "!=", "=>", "matches!", "let VmmKind"].iter().any(|b| code.contains(b))
    }

    #[test]
    fn the_branch_check_sees_comparisons_arms_and_patterns() {
        for branch in [
            "if vmm == VmmKind::Firecracker {",
            "let kind = if VmmKind::Qemu != row.vmm { 1 } else { 2 };",
            "            VmmKind::Qemu => \"qemu-system-x86_64\",",
            "if matches!(row.vmm, VmmKind::Qemu) {",
            "if let VmmKind::Firecracker = vmm {",
        ] {
            assert!(branches_on_vmm_kind(branch), "missed: {branch}");
        }
        for fine in [
            "let check = engine.boot_self_test(VmmKind::Firecracker).await;",
            "match self.store.vmm_proof(VmmKind::Firecracker, inputs.clone()).await {",
            "fn driver(&self, kind: VmmKind) -> Driver {",
            "// if vmm == VmmKind::Qemu, said in a comment",
        ] {
            assert!(!branches_on_vmm_kind(fine), "flagged: {fine}");
        }
    }

    #[test]
    fn the_engine_never_branches_on_the_vmm_kind() {
        // Unit tests (this one included) may name what they like: `daemon_sources` leaves them out.
        let sources = crate::source_scan::daemon_sources("src/engine");
        let scanned = sources.len();
        let mut offenders = vec![];
        for (path, code) in sources {
            for (n, line) in code.lines().enumerate() {
                if branches_on_vmm_kind(line) {
                    offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(scanned > 5, "found only {scanned} engine sources");
        assert!(offenders.is_empty(), "ask vmm::Driver instead of branching on VmmKind:\n{}", offenders.join("\n"));
    }
}
