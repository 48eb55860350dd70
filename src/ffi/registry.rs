//! Handles: ids that name objects across the C boundary. Ids are never reused, and each kind
//! has its own tag in the high bits, so a freed, forged or wrong-kind id is caught.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::boundary::{qwenclip_status, Failure, FfiResult};

pub struct Registry<T> {
    kind: &'static str,
    tag: u64,
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<T>>>,
}

impl<T> Registry<T> {
    pub fn new(kind: &'static str, tag: u16) -> Self {
        Self {
            kind,
            tag: (tag as u64) << 48,
            next: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<T>>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts
        // and removes), so a poisoned lock is still usable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, value: T) -> u64 {
        let id = self.tag | self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(id, Arc::new(value));
        id
    }

    pub fn get(&self, id: u64) -> FfiResult<Arc<T>> {
        self.map().get(&id).cloned().ok_or_else(|| self.bad(id))
    }

    pub fn remove(&self, id: u64) -> FfiResult<Arc<T>> {
        self.map().remove(&id).ok_or_else(|| self.bad(id))
    }

    pub fn all(&self) -> Vec<Arc<T>> {
        self.map().values().cloned().collect()
    }

    fn bad(&self, id: u64) -> Failure {
        let why = if id == 0 {
            "is 0 (never a valid handle)".to_string()
        } else if id & 0xFFFF_0000_0000_0000 != self.tag {
            "is not a handle of this kind".to_string()
        } else if id & 0x0000_FFFF_FFFF_FFFF < self.next.load(Ordering::Relaxed) {
            "was already freed".to_string()
        } else {
            "was never issued".to_string()
        };
        Failure::new(
            qwenclip_status::QWENCLIP_INVALID_HANDLE,
            format!("{} handle {id:#x} {why}", self.kind),
        )
    }
}
