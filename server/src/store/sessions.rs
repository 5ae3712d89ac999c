//! Session records: what the daemon remembers about a guest session (the guest has the live state).
use std::collections::BTreeMap;

use rusqlite::{params, Row};
use tools_schema::session::GuestSessionStatus;

use super::{Store, StoreError};

#[derive(Debug, Clone)]
pub struct SessionRow {
    pub id: String,
    pub vm_id: String,
    pub name: Option<String>,
    pub command: Vec<String>,
    pub cwd: String,
    pub env: BTreeMap<String, String>,
    pub created_at: i64,
    /// The session's last state, recorded when its VM stopped (the guest can no longer be asked).
    pub final_status: Option<GuestSessionStatus>,
}

fn json_err(i: usize, e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

fn session_from_row(r: &Row) -> rusqlite::Result<SessionRow> {
    let command: String = r.get("command")?;
    let env: String = r.get("env")?;
    let final_status: Option<String> = r.get("final_status")?;
    Ok(SessionRow {
        id: r.get("id")?,
        vm_id: r.get("vm_id")?,
        name: r.get("name")?,
        command: serde_json::from_str(&command).map_err(|e| json_err(3, e))?,
        cwd: r.get("cwd")?,
        env: serde_json::from_str(&env).map_err(|e| json_err(5, e))?,
        created_at: r.get("created_at")?,
        final_status: final_status.map(|s| serde_json::from_str(&s)).transpose().map_err(|e| json_err(7, e))?,
    })
}

impl Store {
    pub async fn sessions(&self) -> Result<Vec<SessionRow>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare("SELECT * FROM sessions ORDER BY created_at, id")?;
            let rows = st.query_map([], session_from_row)?.collect::<rusqlite::Result<Vec<_>>>();
            rows
        })
        .await
    }

    /// Inserts a record; a second session with the same (VM, name) violates a unique index.
    pub async fn insert_session(&self, s: SessionRow) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO sessions (id, vm_id, name, command, cwd, env, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    s.id,
                    s.vm_id,
                    s.name,
                    serde_json::to_string(&s.command).expect("strings serialise"),
                    s.cwd,
                    serde_json::to_string(&s.env).expect("strings serialise"),
                    s.created_at
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn delete_session(&self, id: String) -> Result<(), StoreError> {
        self.call(move |c| c.execute("DELETE FROM sessions WHERE id = ?1", [id]).map(|_| ())).await
    }

    /// Records a session's last state (`None` forgets it: the VM runs again and the guest knows best).
    pub async fn set_session_final(&self, id: String, status: Option<GuestSessionStatus>) -> Result<(), StoreError> {
        let json = status.map(|s| serde_json::to_string(&s).expect("status serialises"));
        self.call(move |c| {
            c.execute("UPDATE sessions SET final_status = ?2 WHERE id = ?1", params![id, json]).map(|_| ())
        })
        .await
    }
}

/// Whether an insert failed on a uniqueness constraint.
pub fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
        if f.code == rusqlite::ErrorCode::ConstraintViolation)
}
