//! Range locks: writes to overlapping ranges are applied one after the other; a resync or verify
//! read of a range excludes writes to it meanwhile. The Primary sends a write to the peer while
//! holding its range, so the peer receives overlapping writes in the Primary's order; the peer
//! takes each range in stream order before reading the next frame, so it applies them in that
//! order too. Two waiters for one range are not ordered among themselves (NBD does not order
//! overlapping requests in flight either).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    held: Vec<(u64, u64, u64)>,
    next: u64,
}

/// The lock table.
#[derive(Debug, Default)]
pub struct RangeLocks {
    inner: Mutex<Inner>,
    notify: Notify,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    id: u64,
}

impl RangeLocks {
    /// Waits until no held range overlaps `[offset, offset+len)`, then holds it.
    pub async fn lock(self: &Arc<Self>, offset: u64, len: u64) -> RangeGuard {
        let end = offset.saturating_add(len.max(1));
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut g = self.inner.lock().expect("range lock table poisoned");
                if !g.held.iter().any(|&(_, s, e)| s < end && offset < e) {
                    g.next += 1;
                    let id = g.next;
                    g.held.push((id, offset, end));
                    return RangeGuard { locks: Arc::clone(self), id };
                }
            }
            notified.await;
        }
    }

    /// Ranges held now.
    pub fn held(&self) -> usize {
        self.inner.lock().map(|g| g.held.len()).unwrap_or(0)
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = self.locks.inner.lock() {
            g.held.retain(|&(id, _, _)| id != self.id);
        }
        self.locks.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let l = Arc::new(RangeLocks::default());
        let a = l.lock(0, 8192).await;
        let _b = l.lock(8192, 4096).await; // disjoint: immediate
        let l2 = Arc::clone(&l);
        let mut c = tokio::spawn(async move { l2.lock(4096, 4096).await });
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut c).await.is_err());
        assert_eq!(l.held(), 2);
        drop(a);
        let g = tokio::time::timeout(Duration::from_secs(5), c).await.unwrap().unwrap();
        assert_eq!(l.held(), 2);
        drop(g);
        assert_eq!(l.held(), 1);
    }
}
