//! Saving the parts of a VM and taking their state back, each by its id.
//!
//! Every device that holds guest-visible state is a [`Component`]: the
//! board's (the UART, the keyboard controller, the CMOS, the ACPI PM1
//! block, the PCI root) through [`Persist`], a typed state under a fixed
//! id, and each virtio device under its machine id (`vda`, `eth0`, ...).
//! A snapshot and a migration hold one map of them (`SavedVm::devices`);
//! capture and restore loop over the VM's components and name none, so a
//! new device is one `impl Persist` and one entry in the board's list.
//!
//! Compatibility: a state is typed, and a field added later has a serde
//! default. A board component absent from a state (one saved before it
//! existed) stays as at power-on; a virtio device the machine has must be
//! in it. A state for an id this VM does not have is refused by name.
//!
//! Pausing needs no per-device step: every thread that runs devices or
//! vCPUs parks at one gate (`pause.rs`), after which nothing changes them.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A board device's typed, saved state under a fixed id.
pub trait Persist {
    /// Its key in a saved state.
    const ID: &'static str;
    type State: Serialize + DeserializeOwned;
    fn save(&self) -> Self::State;
    /// Takes `state` back, checked as hostile input: a snapshot file or a
    /// migration peer wrote it.
    fn restore(&mut self, state: Self::State) -> Result<(), String>;
}

/// A part of the VM with saved state, as capture and restore loop over it.
pub trait Component {
    fn id(&self) -> &str;
    /// Whether every state of this VM holds it (otherwise it may be absent
    /// from a state saved before it existed, and stays as at power-on).
    fn required(&self) -> bool;
    fn save(&self) -> Result<serde_json::Value, String>;
    fn restore(&self, state: serde_json::Value) -> Result<(), String>;
}

impl<T: Persist> Component for Mutex<T> {
    fn id(&self) -> &str {
        T::ID
    }

    fn required(&self) -> bool {
        false
    }

    fn save(&self) -> Result<serde_json::Value, String> {
        serde_json::to_value(crate::devices::lock(self).save()).map_err(|e| e.to_string())
    }

    fn restore(&self, state: serde_json::Value) -> Result<(), String> {
        let state: T::State = serde_json::from_value(state).map_err(|e| e.to_string())?;
        crate::devices::lock(self).restore(state)
    }
}

/// Every component's state, by id.
pub fn save_all(
    components: &[&dyn Component],
) -> Result<BTreeMap<String, serde_json::Value>, String> {
    components
        .iter()
        .map(|c| {
            Ok((
                c.id().to_string(),
                c.save().map_err(|e| format!("{}: {e}", c.id()))?,
            ))
        })
        .collect()
}

/// Gives each component the state saved under its id. A state for an id no
/// component has, or none for a required one, is refused before any
/// component changes.
pub fn restore_all(
    components: &[&dyn Component],
    mut states: BTreeMap<String, serde_json::Value>,
) -> Result<(), String> {
    if let Some(unknown) = states
        .keys()
        .find(|id| !components.iter().any(|c| c.id() == id.as_str()))
    {
        return Err(format!(
            "the state has a device {unknown:?} this machine does not have"
        ));
    }
    if let Some(missing) = components
        .iter()
        .find(|c| c.required() && !states.contains_key(c.id()))
    {
        return Err(format!(
            "the state has nothing for device {:?}",
            missing.id()
        ));
    }
    for component in components {
        if let Some(state) = states.remove(component.id()) {
            component
                .restore(state)
                .map_err(|e| format!("{}: {e}", component.id()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Default)]
    struct Counter(u32);

    impl Persist for Counter {
        const ID: &'static str = "counter";
        type State = u32;
        fn save(&self) -> u32 {
            self.0
        }
        fn restore(&mut self, state: u32) -> Result<(), String> {
            if state > 100 {
                return Err(format!("{state} is more than 100"));
            }
            self.0 = state;
            Ok(())
        }
    }

    /// A component every state must hold.
    struct Required(Mutex<u32>);

    impl Component for Required {
        fn id(&self) -> &str {
            "required"
        }
        fn required(&self) -> bool {
            true
        }
        fn save(&self) -> Result<serde_json::Value, String> {
            Ok(json!(*self.0.lock().unwrap()))
        }
        fn restore(&self, state: serde_json::Value) -> Result<(), String> {
            *self.0.lock().unwrap() = serde_json::from_value(state).map_err(|e| e.to_string())?;
            Ok(())
        }
    }

    fn states(pairs: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
        pairs
            .iter()
            .map(|(id, state)| (id.to_string(), state.clone()))
            .collect()
    }

    #[test]
    fn each_component_gets_back_what_it_saved() {
        let counter = Mutex::new(Counter(7));
        let required = Required(Mutex::new(3));
        let saved = save_all(&[&counter, &required]).unwrap();
        assert_eq!(
            saved,
            states(&[("counter", json!(7)), ("required", json!(3))])
        );
        let (counter, required) = (Mutex::new(Counter(0)), Required(Mutex::new(0)));
        restore_all(&[&counter, &required], saved).unwrap();
        assert_eq!(counter.lock().unwrap().0, 7);
        assert_eq!(*required.0.lock().unwrap(), 3);
    }

    #[test]
    fn a_component_missing_from_an_older_state_stays_as_it_was() {
        let counter = Mutex::new(Counter(5));
        let required = Required(Mutex::new(0));
        restore_all(&[&counter, &required], states(&[("required", json!(1))])).unwrap();
        assert_eq!(counter.lock().unwrap().0, 5);
    }

    #[test]
    fn a_required_component_missing_is_refused() {
        let required = Required(Mutex::new(0));
        let error = restore_all(&[&required], states(&[])).unwrap_err();
        assert!(error.contains("nothing for device \"required\""), "{error}");
    }

    #[test]
    fn a_state_for_a_component_this_vm_lacks_is_refused_before_any_changes() {
        let counter = Mutex::new(Counter(5));
        let error = restore_all(
            &[&counter],
            states(&[("counter", json!(9)), ("disk9", json!(1))]),
        )
        .unwrap_err();
        assert!(
            error.contains("\"disk9\" this machine does not have"),
            "{error}"
        );
        assert_eq!(counter.lock().unwrap().0, 5);
    }

    #[test]
    fn a_state_of_the_wrong_type_or_out_of_range_is_refused_with_the_id() {
        let counter = Mutex::new(Counter(0));
        let error = restore_all(&[&counter], states(&[("counter", json!("seven"))])).unwrap_err();
        assert!(error.starts_with("counter: invalid type"), "{error}");
        let error = restore_all(&[&counter], states(&[("counter", json!(101))])).unwrap_err();
        assert_eq!(error, "counter: 101 is more than 100");
    }
}
