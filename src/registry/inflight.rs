//! Registry requests that span an await and must not overlap on one
//! volume: a clone being made of it (its base snapshot is taken through
//! its actor, then the clone's image is made), a remove, a resize. The
//! registry checks and marks them in one handler call, so two requests
//! racing on the plugin socket cannot both pass: a remove that started
//! first would delete the parent under the new clone, a clone that started
//! first would be missed by the remove's check for clones (not in the
//! catalog yet), and a resize between a clone's size check and its
//! snapshot would give the clone a record of the old size.

use std::collections::{HashMap, HashSet};

/// What is under way, by volume id.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Clones being made, by their parent's id.
    cloning: HashMap<String, usize>,
    removing: HashSet<String>,
    resizing: HashSet<String>,
}

/// Why a request must wait for another on the same volume.
pub type Conflict = &'static str;

impl InFlight {
    /// Mark a clone of `parent` under way, unless it is being removed or
    /// resized.
    pub fn start_clone(&mut self, parent: &str) -> Result<(), Conflict> {
        if self.removing.contains(parent) {
            return Err("it is being removed");
        }
        if self.resizing.contains(parent) {
            return Err("it is being resized");
        }
        *self.cloning.entry(parent.to_string()).or_default() += 1;
        Ok(())
    }

    pub fn end_clone(&mut self, parent: &str) {
        if let Some(n) = self.cloning.get_mut(parent) {
            *n -= 1;
            if *n == 0 {
                self.cloning.remove(parent);
            }
        }
    }

    /// Mark `id` being removed, unless a clone of it is being made.
    pub fn start_remove(&mut self, id: &str) -> Result<(), Conflict> {
        if self.cloning.contains_key(id) {
            return Err("a clone of it is being made");
        }
        self.removing.insert(id.to_string());
        Ok(())
    }

    pub fn end_remove(&mut self, id: &str) {
        self.removing.remove(id);
    }

    /// Mark `id` being resized, unless a clone of it is being made (or
    /// another resize runs: the second would check against a stale size).
    pub fn start_resize(&mut self, id: &str) -> Result<(), Conflict> {
        if self.cloning.contains_key(id) {
            return Err("a clone of it is being made");
        }
        if !self.resizing.insert(id.to_string()) {
            return Err("it is being resized");
        }
        Ok(())
    }

    pub fn end_resize(&mut self, id: &str) {
        self.resizing.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_and_a_remove_of_its_parent_exclude_each_other() {
        let mut f = InFlight::default();
        f.start_clone("p").unwrap();
        f.start_clone("p").unwrap();
        assert_eq!(f.start_remove("p"), Err("a clone of it is being made"));
        f.end_clone("p");
        assert!(f.start_remove("p").is_err(), "one clone is still under way");
        f.end_clone("p");
        f.start_remove("p").unwrap();
        assert_eq!(f.start_clone("p"), Err("it is being removed"));
        // Other volumes are not held up.
        f.start_clone("q").unwrap();
        f.end_remove("p");
        f.start_clone("p").unwrap();
    }

    #[test]
    fn a_clone_and_a_resize_of_its_parent_exclude_each_other() {
        let mut f = InFlight::default();
        f.start_resize("p").unwrap();
        assert_eq!(f.start_resize("p"), Err("it is being resized"));
        assert_eq!(f.start_clone("p"), Err("it is being resized"));
        f.end_resize("p");
        f.start_clone("p").unwrap();
        assert_eq!(f.start_resize("p"), Err("a clone of it is being made"));
        f.end_clone("p");
        f.start_resize("p").unwrap();
    }

    #[test]
    fn ending_what_was_not_started_changes_nothing() {
        let mut f = InFlight::default();
        f.end_clone("p");
        f.end_remove("p");
        f.end_resize("p");
        f.start_clone("p").unwrap();
        f.end_clone("x");
        assert!(f.start_remove("p").is_err());
    }
}
