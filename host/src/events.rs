//! State changes as a stream: every VM state change is published here and
//! served to clients as Server-Sent Events (`GET /v1/events`).

use crate::model::VmRecord;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Event {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    pub vm: String,
    pub name: String,
    pub project: String,
    /// The new state, or `deleted`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Event {
    pub fn state(record: &VmRecord) -> Event {
        Event {
            time_ms: now_ms(),
            vm: record.id.clone(),
            name: record.spec.name.clone(),
            project: record.project.clone(),
            state: record.state.name().to_string(),
            detail: record.last_exit.clone(),
        }
    }

    pub fn deleted(record: &VmRecord) -> Event {
        Event {
            state: "deleted".into(),
            detail: None,
            ..Event::state(record)
        }
    }
}

/// Fan-out of events to every subscriber; slow subscribers miss events
/// (and are told how many) rather than holding anyone up.
#[derive(Clone)]
pub struct EventBus(broadcast::Sender<Event>);

impl Default for EventBus {
    fn default() -> Self {
        EventBus(broadcast::channel(1024).0)
    }
}

impl EventBus {
    pub fn publish(&self, event: Event) {
        tracing::info!(vm = %event.vm, project = %event.project, state = %event.state, "event");
        let _ = self.0.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.0.subscribe()
    }
}
