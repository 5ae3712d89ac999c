//! The list of operations: one entry per daemon operation, shared by every front door.
//!
//! Naming rule: JSON-RPC method `vm.create` is MCP tool `vm_create`, CLI command `banger vm create` and
//! daemon handler `Engine::vm_create`. `for_each_operation!` hands the list to a callback macro so the
//! daemon can generate its dispatcher from it; `OPERATIONS` is the same list as data.
use schemars::{JsonSchema, Schema};
use serde::{de::DeserializeOwned, Serialize};

/// A typed operation: its method name and its parameter and result types.
pub trait Operation {
    const METHOD: &'static str;
    type Params: Serialize + DeserializeOwned + JsonSchema;
    type Result: Serialize + DeserializeOwned + JsonSchema;
}

/// An operation described as data, for tool listings, docs and schema snapshots.
#[derive(Debug, Clone, Copy)]
pub struct OperationSpec {
    /// JSON-RPC method name, e.g. `vm.create`.
    pub method: &'static str,
    /// What the operation does and when to use it.
    pub description: &'static str,
    /// Changes nothing.
    pub read_only: bool,
    /// May destroy something the user had (a VM, its disks, an image).
    pub destructive: bool,
    /// Repeating it with the same arguments has no further effect.
    pub idempotent: bool,
    pub params_schema: fn() -> Schema,
    pub result_schema: fn() -> Schema,
    /// Whether a JSON value decodes as this operation's params (an error's next step is checked so).
    pub check_params: fn(&serde_json::Value) -> Result<(), String>,
}

impl OperationSpec {
    /// MCP tool name: the method with `.` replaced by `_`.
    pub fn tool_name(&self) -> String {
        self.method.replace('.', "_")
    }
    /// The method for an MCP tool name, if there is one.
    pub fn by_tool_name(tool: &str) -> Option<&'static OperationSpec> {
        OPERATIONS.iter().find(|op| op.tool_name() == tool)
    }
    pub fn by_method(method: &str) -> Option<&'static OperationSpec> {
        OPERATIONS.iter().find(|op| op.method == method)
    }
}

/// Calls `$callback! { (Type, handler_ident, "method", Params, Result, read_only, destructive, idempotent, "description"), ... }`
/// with every operation. The single list of banger's public operations.
#[macro_export]
macro_rules! for_each_operation {
    ($callback:ident) => {
        $callback! {
            (DaemonPing, daemon_ping, "daemon.ping",
             $crate::daemon::Empty, $crate::daemon::PingResult, true, false, true,
             "Check that the banger daemon is up and report its build (version, commit, build time)."),
            (DaemonStatus, daemon_status, "daemon.status",
             $crate::daemon::Empty, $crate::daemon::DaemonStatus, true, false, true,
             "Report the daemon's build, socket, state directory, log file, VM and image counts, and which VMM \
new VMs will use and why."),
            (DoctorRun, doctor_run, "doctor.run",
             $crate::daemon::DoctorParams, $crate::daemon::DoctorReport, true, false, true,
             "Check every host prerequisite (VMM binaries, KVM kind, guest kernel, images, networking tools, \
socket permissions) and report pass/warn/fail with the fix for each. With `boot: true`, also boot a throwaway \
guest on each VMM this host can run and report its create-to-ready time."),
            (ImageRegister, image_register, "image.register",
             $crate::image::ImageRegisterParams, $crate::image::ImageInfo, false, false, false,
             "Register an existing guest kernel, optional initramfs and ext4 root filesystem as a named image. \
The daemon copies the files into its store."),
            (ImageBuild, image_build, "image.build",
             $crate::image::ImageBuildParams, $crate::image::ImageBuildResult, false, false, true,
             "Build an image on the host from a recipe (`debian-minimal`; `debian-agent` adds node, claude, \
opencode, pi, tmux and build tools) or from a registered image plus a host script, and register it. Waits until \
done and reports stages (rootfs, customize, assemble, register) as progress; cancelling removes everything the \
build made. Building the same inputs again under the same name returns the existing image (`reused`); the \
recipe's root filesystem is cached between builds."),
            (ImageBuildBegin, image_build_begin, "image.build_begin",
             $crate::image::ImageBuildParams, $crate::operation::OperationInfo, false, false, false,
             "Start an image build (see image_build) and return at once with an operation to follow with \
operation_status or stop with operation_cancel."),
            (ImageWarm, image_warm, "image.warm",
             $crate::image::ImageWarmParams, $crate::image::TemplateInfo, false, false, true,
             "Prepare an image's warm-start template for a VM shape: boot a guest once, save it when its agent is \
ready, and from then on restore every new VM of that image and shape from it (each clone gets its own MAC, IP, \
hostname, SSH host key, RNG state and clock). An up-to-date template is reused; a template whose image, kernel or \
banger version changed is rebuilt. vm_create builds missing templates in the background by itself; this makes one \
now."),
            (ImageList, image_list, "image.list",
             $crate::daemon::Empty, $crate::image::ImageList, true, false, true,
             "List registered images; the default image is marked."),
            (ImageShow, image_show, "image.show",
             $crate::image::ImageRef, $crate::image::ImageInfo, true, false, true,
             "Show one image by name or id: its files, size, content fingerprint and whether it is the default."),
            (ImagePromote, image_promote, "image.promote",
             $crate::image::ImageRef, $crate::image::ImageInfo, false, false, true,
             "Make an image the default for new VMs."),
            (ImageDelete, image_delete, "image.delete",
             $crate::image::ImageRef, $crate::image::ImageDeleted, false, true, false,
             "Delete an image and its files. Refused while any VM still uses it."),
            (VmCreate, vm_create, "vm.create",
             $crate::vm::VmCreateParams, $crate::vm::VmInfo, false, false, false,
             "Create a VM from an image (the default unless named; image_list says what each provides) and boot \
it. Returns when it is ready for vm_exec; a failure or cancellation rolls back everything it made."),
            (VmCreateBegin, vm_create_begin, "vm.create_begin",
             $crate::vm::VmCreateParams, $crate::operation::OperationInfo, false, false, false,
             "Start creating a VM and return at once with an operation id. Follow it with operation_status \
(stages with timings: allocate, disks, network, boot, agent, ready) and stop it with \
operation_cancel, which rolls back everything the create made."),
            (VmRun, vm_run, "vm.run",
             $crate::workspace::VmRunParams, $crate::workspace::VmRunResult, false, false, false,
             "Create a VM and copy a host git repository into it at /root/repo, in one operation (stages \
create, sshd, prepare, reported as progress). A failure or cancellation at any \
stage deletes the VM it made."),
            (VmRunBegin, vm_run_begin, "vm.run_begin",
             $crate::workspace::VmRunParams, $crate::operation::OperationInfo, false, false, false,
             "Start a vm_run and return at once with an operation id (create errors such as a taken name come \
back at once). Follow it with operation_status (its result is in `vm` and `workspace`) and stop it with \
operation_cancel, which deletes the VM it made."),
            (OperationStatus, operation_status, "operation.status",
             $crate::operation::OperationRef, $crate::operation::OperationInfo, true, false, true,
             "Report where a long-running operation is: its state, each stage with its duration, and its \
result or error once finished."),
            (OperationWait, operation_wait, "operation.wait",
             $crate::operation::OperationWaitParams, $crate::operation::OperationInfo, true, false, true,
             "Wait until a long-running operation changes (a stage starts or ends, new detail, its outcome) \
and report it as operation_status does: pass the `revision` you last saw as `after`. Answers at once if it \
changed meanwhile or has finished, else at the change or after `timeout_ms`. Follow an operation with this \
instead of polling operation_status."),
            (OperationCancel, operation_cancel, "operation.cancel",
             $crate::operation::OperationRef, $crate::operation::OperationInfo, false, false, true,
             "Cancel a running operation and wait until it has rolled back what it made. Cancelling a \
finished operation changes nothing."),
            (OperationList, operation_list, "operation.list",
             $crate::daemon::Empty, $crate::operation::OperationList, true, false, true,
             "List long-running operations that are running or finished in the last ten minutes."),
            (VmList, vm_list, "vm.list",
             $crate::daemon::Empty, $crate::vm::VmList, true, false, true,
             "List every VM with its state, image, size and VMM."),
            (VmShow, vm_show, "vm.show",
             $crate::vm::VmRef, $crate::vm::VmInfo, true, false, true,
             "Show one VM by name or id: state, image, size, VMM, process id and the reason if it failed."),
            (VmStart, vm_start, "vm.start",
             $crate::vm::VmRefs, $crate::vm::VmBatchResult, false, false, true,
             "Boot one or more stopped VMs, keeping their disks. Waits until each guest agent answers."),
            (VmStop, vm_stop, "vm.stop",
             $crate::vm::VmRefs, $crate::vm::VmBatchResult, false, false, true,
             "Shut down one or more VMs gracefully (forced after a grace period). Disks are kept; vm_start \
boots them again."),
            (VmRestart, vm_restart, "vm.restart",
             $crate::vm::VmRefs, $crate::vm::VmBatchResult, false, false, false,
             "Stop then start one or more VMs."),
            (VmKill, vm_kill, "vm.kill",
             $crate::vm::VmRefs, $crate::vm::VmBatchResult, false, false, true,
             "Force off one or more VMs at once, without a guest shutdown. Disks are kept."),
            (VmSet, vm_set, "vm.set",
             $crate::vm::VmSetParams, $crate::vm::VmBatchResult, false, false, true,
             "Change vcpus, memory, root or work disk size (grow only) or NAT of one or more stopped VMs. Values are \
checked before anything changes; the new shape applies at the next vm_start."),
            (VmStats, vm_stats, "vm.stats",
             $crate::vm::VmRef, $crate::vm::VmStats, true, false, true,
             "Resource use of a VM: the VMM's CPU time and memory on the host, disk size and host space used, \
and, while it runs, the guest's uptime, load, memory and root filesystem use."),
            (VmDelete, vm_delete, "vm.delete",
             $crate::vm::VmRefs, $crate::vm::VmBatchResult, false, true, false,
             "Delete one or more VMs: stops them if running and removes their disks and records. Irreversible."),
            (VmExec, vm_exec, "vm.exec",
             $crate::vm::VmExecParams, $crate::vm::VmExecResult, false, false, false,
             "Run a command in a running VM and return its exit code, stdout and stderr (each inline up to \
max_inline_bytes; longer output is kept whole for vm_exec_output)."),
            (VmExecOutput, vm_exec_output, "vm.exec_output",
             $crate::vm::VmExecOutputParams, $crate::vm::VmExecOutputChunk, true, false, true,
             "Read more of a command's output when its vm_exec result was cut (an output_id): a chunk from an \
offset, with next_offset to go on."),
            (VmSsh, vm_ssh, "vm.ssh",
             $crate::vm::VmRef, $crate::vm::VmSshInfo, true, false, true,
             "Wait (up to 30 s) until a running VM's sshd answers and the daemon has pinned its host key, and \
return how to ssh into it: its address and the ssh options (root, banger's managed key, strict host-key checking \
against banger's known_hosts). `ready` says whether sshd answered in time."),
            (VmPorts, vm_ports, "vm.ports",
             $crate::vm::VmRef, $crate::vm::VmPorts, true, false, true,
             "A running VM's listening ports, their processes and where to reach each from the host \
(<name>.vm:PORT; web services as http(s) URLs)."),
            (VmFileWrite, vm_file_write, "vm.file_write",
             $crate::vm::VmFileWriteParams, $crate::vm::VmFileWriteResult, false, true, false,
             "Write a file in a running VM (text, or base64 for binary; up to 8 MiB per call, append for more), \
creating parent directories, with an optional octal mode."),
            (VmFileRead, vm_file_read, "vm.file_read",
             $crate::vm::VmFileReadParams, $crate::vm::VmFileReadResult, true, false, true,
             "Read a file in a running VM: up to 8 MiB per call from an offset, as text or base64, with its \
size, mode, checksum, and next_offset when there is more."),
            (WorkspacePrepare, workspace_prepare, "workspace.prepare",
             $crate::workspace::WorkspacePrepareParams, $crate::workspace::WorkspacePrepareResult, false, true, false,
             "Copy a host git repository into a running VM at /root/repo: its history (same HEAD), tracked files \
with uncommitted edits, in full mode also untracked files and submodules. Returns base_commit, which \
workspace_export diffs against. Cancelling keeps nothing half-made."),
            (WorkspaceExport, workspace_export, "workspace.export",
             $crate::workspace::WorkspaceExportParams, $crate::workspace::WorkspaceExportResult, false, true, false,
             "One binary-safe patch of everything the guest changed in /root/repo since the prepare base (commits, \
uncommitted and untracked changes, deletions, renames), with the changed files; check_repo checks it applies \
there, delete then deletes the VM."),
            (VmLogs, vm_logs, "vm.logs",
             $crate::vm::VmLogsParams, $crate::vm::VmLogs, true, false, true,
             "Return the tail of a VM's console (boot) log. The first place to look when a VM failed to start."),
            (SessionStart, session_start, "session.start",
             $crate::session::SessionStartParams, $crate::session::SessionStartResult, false, false, false,
             "Start a long-lived command (a session) in a running VM; it survives daemon restarts and \
client disconnects. input feeds its stdin, wait_ms returns its first output."),
            (SessionSend, session_send, "session.send",
             $crate::session::SessionSendParams, $crate::session::SessionSendResult, false, false, false,
             "Write data to a session's stdin, whole (concurrent sends never interleave); wait_ms returns the \
output that follows."),
            (SessionLogs, session_logs, "session.logs",
             $crate::session::SessionLogsParams, $crate::session::SessionLogs, true, false, true,
             "Read a session's output (stdout and stderr in order, each chunk labelled) from a byte cursor: \
offset 0 replays everything, next_offset continues; wait_ms waits for output not there yet."),
            (SessionList, session_list, "session.list",
             $crate::session::SessionListParams, $crate::session::SessionList, true, false, true,
             "List sessions of one VM (or of every VM) with state, exit code or signal, and output size."),
            (SessionShow, session_show, "session.show",
             $crate::session::SessionRef, $crate::session::SessionInfo, true, false, true,
             "Show one session: state, exit code or signal, timings, the resolved program and pid, whether \
stdin is open and whether someone is attached, or why it was lost."),
            (SessionStop, session_stop, "session.stop",
             $crate::session::SessionStopParams, $crate::session::SessionInfo, false, false, true,
             "Stop a session: SIGTERM to its process group, SIGKILL after grace_secs (default 5). Returns its \
exit code or signal; its log stays readable."),
            (SessionKill, session_kill, "session.kill",
             $crate::session::SessionRef, $crate::session::SessionInfo, false, false, true,
             "Kill a session's process group at once (SIGKILL) and return its final state. Its output log \
stays readable."),
        }
    };
}

macro_rules! define_operations {
    ($( ($ty:ident, $handler:ident, $method:literal, $params:ty, $result:ty,
         $ro:literal, $destructive:literal, $idem:literal, $desc:literal) ),* $(,)?) => {
        $(
            #[doc = $desc]
            pub struct $ty;
            impl Operation for $ty {
                const METHOD: &'static str = $method;
                type Params = $params;
                type Result = $result;
            }
        )*
        /// Every operation, in a stable order.
        pub const OPERATIONS: &[OperationSpec] = &[
            $(
                OperationSpec {
                    method: $method,
                    description: $desc,
                    read_only: $ro,
                    destructive: $destructive,
                    idempotent: $idem,
                    params_schema: || schemars::schema_for!($params),
                    result_schema: || schemars::schema_for!($result),
                    check_params: |v| serde_json::from_value::<$params>(v.clone()).map(drop).map_err(|e| e.to_string()),
                },
            )*
        ];
    };
}

crate::for_each_operation!(define_operations);

/// Params with all fields optional serialise to `{}`; JSON-RPC callers may also send no params at all.
pub fn params_or_empty(params: Option<serde_json::Value>) -> serde_json::Value {
    match params {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(v) => v,
    }
}
