//! The daemon's SQLite store: images and VMs.
//!
//! Every connection gets the same profile (WAL, busy timeout, foreign keys), and the schema is migrated
//! by version (`PRAGMA user_version`) when the store opens. Calls run on the blocking pool so a slow disk
//! never stalls the async runtime.
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, Row};
use tools_schema::daemon::VmmKind;
use tools_schema::vm::VmState;

mod sessions;
pub use sessions::{is_unique_violation, SessionRow};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database task failed: {0}")]
    Join(#[source] tokio::task::JoinError),
    #[error("database file: creating {path}: {source}")]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database schema version {found} is newer than this bangerd understands ({known}); upgrade banger")]
    TooNew { found: i64, known: i64 },
}

/// Schema migrations; entry N brings the schema from version N to N+1. Never edit a shipped entry.
const MIGRATIONS: &[&str] = &[
    // 1: images and VMs.
    "CREATE TABLE images (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kernel TEXT NOT NULL,
        kernel_elf TEXT,
        initrd TEXT,
        rootfs TEXT NOT NULL,
        rootfs_bytes INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        is_default INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        image_id TEXT NOT NULL REFERENCES images(id),
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        vmm TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        last_error TEXT
     );",
    // 2: networking. A unique address per VM; the TAP it holds while running; NAT opt-in.
    "ALTER TABLE vms ADD COLUMN ip TEXT;
     ALTER TABLE vms ADD COLUMN mac TEXT;
     ALTER TABLE vms ADD COLUMN tap TEXT;
     ALTER TABLE vms ADD COLUMN nat INTEGER NOT NULL DEFAULT 0;
     CREATE UNIQUE INDEX vms_ip ON vms(ip) WHERE ip IS NOT NULL;",
    // 3: images carry a work seed, the ext4 each VM's /root disk is cloned from ('' for older images).
    "ALTER TABLE images ADD COLUMN work_seed TEXT NOT NULL DEFAULT '';",
    // 4: built images record their build id (stamped into the image as /etc/banger/image.json) and source.
    "ALTER TABLE images ADD COLUMN build_id TEXT;
     ALTER TABLE images ADD COLUMN source TEXT;",
    // 5: pipe-mode sessions (they run in the guest; this is what the daemon must remember about them).
    "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        name TEXT,
        command TEXT NOT NULL,
        cwd TEXT NOT NULL,
        env TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        final_status TEXT
     );
     CREATE UNIQUE INDEX sessions_vm_name ON sessions(vm_id, name) WHERE name IS NOT NULL;",
    // 6: a MAC address belongs to one VM (picked under the allocation lock; this is the backstop).
    "CREATE UNIQUE INDEX vms_mac ON vms(mac) WHERE mac IS NOT NULL;",
    // 7: boot self-tests of a VMM on this host, keyed by what they proved (banger build, kernel, binary).
    "CREATE TABLE vmm_proofs (
        vmm TEXT NOT NULL,
        inputs TEXT NOT NULL,
        passed INTEGER NOT NULL,
        detail TEXT NOT NULL,
        at INTEGER NOT NULL,
        PRIMARY KEY (vmm, inputs)
     );",
    // 8: containment. The uid a VM's host processes run as (its own, from the configured range; kept across
    // stops, freed with the VM) and a CPU limit set by `vm.set` (NULL: the default of its shape).
    "ALTER TABLE vms ADD COLUMN vmm_uid INTEGER;
     ALTER TABLE vms ADD COLUMN cpu_percent INTEGER;
     CREATE UNIQUE INDEX vms_vmm_uid ON vms(vmm_uid) WHERE vmm_uid IS NOT NULL;",
];

/// The outcome of a VMM's boot self-test with given inputs.
#[derive(Debug, Clone)]
pub struct VmmProof {
    pub passed: bool,
    pub detail: String,
    pub at: i64,
}

#[derive(Debug, Clone)]
pub struct ImageRow {
    pub id: String,
    pub name: String,
    pub kernel: String,
    pub kernel_elf: Option<String>,
    pub initrd: Option<String>,
    pub rootfs: String,
    pub rootfs_bytes: u64,
    pub fingerprint: String,
    pub is_default: bool,
    pub created_at: i64,
    pub work_seed: String,
    /// Set for images made by `image.build`: the id of the build's inputs, also inside the image.
    pub build_id: Option<String>,
    /// What a built image was made from, e.g. `recipe debian-agent`.
    pub source: Option<String>,
}

#[derive(Debug, Clone)]
pub struct VmRow {
    pub id: String,
    pub name: String,
    pub image_id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub vmm: VmmKind,
    pub state: VmState,
    pub pid: Option<u32>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub last_error: Option<String>,
    pub ip: Option<std::net::Ipv4Addr>,
    pub mac: Option<String>,
    pub tap: Option<String>,
    pub nat: bool,
    /// The uid its VMM and helpers run as (containment), given at its first contained boot.
    pub vmm_uid: Option<u32>,
    /// A CPU limit other than its shape's, in percent of one host CPU.
    pub cpu_percent: Option<u32>,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // Created 0600 before SQLite opens it (its -wal and -shm files take the database's mode): session
        // records hold the environment callers gave, API keys included.
        if path.parent().is_some_and(|d| d.is_dir()) {
            crate::host_files::create_private(path)
                .map_err(|source| StoreError::Create { path: path.to_path_buf(), source })?;
        }
        let mut conn = open_connection(path)?;
        migrate(&mut conn)?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock();
            f(&mut c).map_err(StoreError::from)
        })
        .await
        .map_err(StoreError::Join)?
    }

    pub async fn images(&self) -> Result<Vec<ImageRow>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare("SELECT * FROM images ORDER BY created_at, name")?;
            let rows = st.query_map([], image_from_row)?.collect::<rusqlite::Result<Vec<_>>>();
            rows
        })
        .await
    }

    pub async fn insert_image(&self, img: ImageRow) -> Result<(), StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            if img.is_default {
                tx.execute("UPDATE images SET is_default = 0", [])?;
            }
            tx.execute(
                "INSERT INTO images (id, name, kernel, kernel_elf, initrd, rootfs, rootfs_bytes, fingerprint, is_default, created_at,
                                     work_seed, build_id, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![img.id, img.name, img.kernel, img.kernel_elf, img.initrd, img.rootfs, img.rootfs_bytes as i64,
                        img.fingerprint, img.is_default, img.created_at, img.work_seed, img.build_id, img.source],
            )?;
            tx.commit()
        })
        .await
    }

    pub async fn set_default_image(&self, id: String) -> Result<(), StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute("UPDATE images SET is_default = (id = ?1)", [id])?;
            tx.commit()
        })
        .await
    }

    pub async fn delete_image(&self, id: String) -> Result<(), StoreError> {
        self.call(move |c| c.execute("DELETE FROM images WHERE id = ?1", [id]).map(|_| ())).await
    }

    pub async fn vms(&self) -> Result<Vec<VmRow>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare("SELECT * FROM vms ORDER BY created_at, name")?;
            let rows = st.query_map([], vm_from_row)?.collect::<rusqlite::Result<Vec<_>>>();
            rows
        })
        .await
    }

    pub async fn vm(&self, id: String) -> Result<Option<VmRow>, StoreError> {
        self.call(move |c| c.query_row("SELECT * FROM vms WHERE id = ?1", [id], vm_from_row).optional()).await
    }

    pub async fn insert_vm(&self, vm: VmRow) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO vms (id, name, image_id, vcpus, memory_mib, vmm, state, pid, created_at, started_at, last_error,
                                  ip, mac, tap, nat)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![vm.id, vm.name, vm.image_id, vm.vcpus, vm.memory_mib, vm.vmm.as_str(), vm.state.as_str(),
                        vm.pid, vm.created_at, vm.started_at, vm.last_error, vm.ip.map(|i| i.to_string()), vm.mac,
                        vm.tap, vm.nat],
            )
            .map(|_| ())
        })
        .await
    }

    /// Records a state change, with the VMM pid and boot time when running and the reason when failed.
    pub async fn set_vm_state(
        &self,
        id: String,
        state: VmState,
        pid: Option<u32>,
        started_at: Option<i64>,
        last_error: Option<String>,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE vms SET state = ?2, pid = ?3, started_at = COALESCE(?4, started_at), last_error = ?5 WHERE id = ?1",
                params![id, state.as_str(), pid, started_at, last_error],
            )
            .map(|_| ())
        })
        .await
    }

    /// Changes a VM's shape; `None` keeps a value.
    pub async fn set_vm_shape(
        &self,
        id: String,
        vcpus: Option<u32>,
        memory_mib: Option<u32>,
        nat: Option<bool>,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE vms SET vcpus = COALESCE(?2, vcpus), memory_mib = COALESCE(?3, memory_mib), nat = COALESCE(?4, nat)
                 WHERE id = ?1",
                params![id, vcpus, memory_mib, nat],
            )
            .map(|_| ())
        })
        .await
    }

    /// Gives a VM its uid, unless another VM has that uid (then false).
    pub async fn claim_vm_uid(&self, id: String, uid: u32) -> Result<bool, StoreError> {
        self.call(move |c| {
            let taken: bool = c.query_row(
                "SELECT EXISTS(SELECT 1 FROM vms WHERE vmm_uid = ?1 AND id != ?2)",
                params![uid, id],
                |r| r.get(0),
            )?;
            if taken {
                return Ok(false);
            }
            c.execute("UPDATE vms SET vmm_uid = ?2 WHERE id = ?1", params![id, uid])?;
            Ok(true)
        })
        .await
    }

    /// Every uid some VM holds.
    pub async fn vm_uids(&self) -> Result<std::collections::HashSet<u32>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare("SELECT vmm_uid FROM vms WHERE vmm_uid IS NOT NULL")?;
            let uids = st.query_map([], |r| r.get::<_, u32>(0))?.collect::<rusqlite::Result<_>>();
            uids
        })
        .await
    }

    /// Sets (Some) or clears (None: back to its shape's default) a VM's CPU limit.
    pub async fn set_vm_cpu_percent(&self, id: String, percent: Option<u32>) -> Result<(), StoreError> {
        self.call(move |c| c.execute("UPDATE vms SET cpu_percent = ?2 WHERE id = ?1", params![id, percent]).map(|_| ()))
            .await
    }

    /// Records which TAP a VM holds (None once released).
    pub async fn set_vm_tap(&self, id: String, tap: Option<String>) -> Result<(), StoreError> {
        self.call(move |c| c.execute("UPDATE vms SET tap = ?2 WHERE id = ?1", params![id, tap]).map(|_| ())).await
    }

    pub async fn vmm_proof(&self, vmm: VmmKind, inputs: String) -> Result<Option<VmmProof>, StoreError> {
        self.call(move |c| {
            c.query_row(
                "SELECT passed, detail, at FROM vmm_proofs WHERE vmm = ?1 AND inputs = ?2",
                params![vmm.as_str(), inputs],
                |r| Ok(VmmProof { passed: r.get(0)?, detail: r.get(1)?, at: r.get(2)? }),
            )
            .optional()
        })
        .await
    }

    /// Records a self-test's outcome; the newest one for the same inputs replaces the older.
    pub async fn record_vmm_proof(
        &self,
        vmm: VmmKind,
        inputs: String,
        passed: bool,
        detail: String,
    ) -> Result<(), StoreError> {
        let at = crate::engine::now();
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO vmm_proofs (vmm, inputs, passed, detail, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![vmm.as_str(), inputs, passed, detail, at],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn delete_vm(&self, id: String) -> Result<(), StoreError> {
        self.call(move |c| c.execute("DELETE FROM vms WHERE id = ?1", [id]).map(|_| ())).await
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew { found: version, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

fn image_from_row(r: &Row) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        id: r.get("id")?,
        name: r.get("name")?,
        kernel: r.get("kernel")?,
        kernel_elf: r.get("kernel_elf")?,
        initrd: r.get("initrd")?,
        rootfs: r.get("rootfs")?,
        rootfs_bytes: r.get::<_, i64>("rootfs_bytes")? as u64,
        fingerprint: r.get("fingerprint")?,
        is_default: r.get("is_default")?,
        created_at: r.get("created_at")?,
        work_seed: r.get("work_seed")?,
        build_id: r.get("build_id")?,
        source: r.get("source")?,
    })
}

fn vm_from_row(r: &Row) -> rusqlite::Result<VmRow> {
    let text_err =
        |i: usize, msg: String| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, msg.into());
    let vmm: String = r.get("vmm")?;
    let state: String = r.get("state")?;
    Ok(VmRow {
        id: r.get("id")?,
        name: r.get("name")?,
        image_id: r.get("image_id")?,
        vcpus: r.get("vcpus")?,
        memory_mib: r.get("memory_mib")?,
        vmm: vmm.parse().map_err(|e: String| text_err(5, e))?,
        state: parse_state(&state).ok_or_else(|| text_err(6, format!("unknown VM state `{state}`")))?,
        pid: r.get("pid")?,
        created_at: r.get("created_at")?,
        started_at: r.get("started_at")?,
        last_error: r.get("last_error")?,
        ip: r
            .get::<_, Option<String>>("ip")?
            .map(|s| s.parse().map_err(|e| text_err(11, format!("bad ip `{s}`: {e}"))))
            .transpose()?,
        mac: r.get("mac")?,
        tap: r.get("tap")?,
        nat: r.get("nat")?,
        vmm_uid: r.get("vmm_uid")?,
        cpu_percent: r.get("cpu_percent")?,
    })
}

fn parse_state(s: &str) -> Option<VmState> {
    [VmState::Starting, VmState::Running, VmState::Stopping, VmState::Stopped, VmState::Failed]
        .into_iter()
        .find(|st| st.as_str() == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrations_apply_once_and_connections_have_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap(); // re-open: no migration runs twice
        let (version, fk, mode): (i64, i64, String) = store
            .call(|c| {
                Ok((
                    c.pragma_query_value(None, "user_version", |r| r.get(0))?,
                    c.pragma_query_value(None, "foreign_keys", |r| r.get(0))?,
                    c.pragma_query_value(None, "journal_mode", |r| r.get(0))?,
                ))
            })
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        assert_eq!(fk, 1);
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn a_vm_cannot_reference_a_missing_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).unwrap();
        let vm = VmRow {
            id: "v1".into(),
            name: "a".into(),
            image_id: "nope".into(),
            vcpus: 1,
            memory_mib: 256,
            vmm: VmmKind::Qemu,
            state: VmState::Stopped,
            pid: None,
            created_at: 0,
            started_at: None,
            last_error: None,
            ip: None,
            mac: None,
            tap: None,
            nat: false,
            vmm_uid: None,
            cpu_percent: None,
        };
        assert!(store.insert_vm(vm).await.is_err(), "foreign keys must be enforced");
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let c = open_connection(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(Store::open(&path), Err(StoreError::TooNew { found: 99, .. })));
    }
}
