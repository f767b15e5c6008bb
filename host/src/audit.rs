//! The append-only audit log: one JSON line per mutating call, with who,
//! what, on which VM, and how it ended. Written with O_APPEND and synced
//! before the answer goes out.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use utoipa::ToSchema;

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct AuditEntry {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    pub who: String,
    /// The project acted in (empty for host-wide calls).
    pub project: String,
    /// Method and route, e.g. `POST /v1/vms/{id}/start`.
    pub action: String,
    /// The VM or token acted on.
    pub target: String,
    /// The HTTP status of the answer.
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn record(&self, entry: &AuditEntry) {
        let mut line = serde_json::to_string(entry).expect("audit entries serialize");
        line.push('\n');
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let written = (&*file)
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            tracing::error!("cannot write the audit log {}: {e}", self.path.display());
        }
    }

    /// Entries in `project` (all when None), newest last, at most `limit`.
    pub fn read(&self, project: Option<&str>, limit: usize) -> std::io::Result<Vec<AuditEntry>> {
        let text = std::fs::read_to_string(&self.path)?;
        let mut entries: Vec<AuditEntry> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .filter(|entry: &AuditEntry| project.is_none_or(|p| entry.project == p))
            .collect();
        let skip = entries.len().saturating_sub(limit);
        entries.drain(..skip);
        Ok(entries)
    }
}
