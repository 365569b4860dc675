//! Tests only: a global allocator that looks for a marker in every block freed while a test
//! watches, so that a test can show that a secret was wiped before its memory was released
//! (a copy left in freed heap memory is what the wiping is about). Reallocation goes through
//! `alloc` and `dealloc` here, so the block a growing buffer leaves behind is checked too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The bytes a watching test uses as its secret (or a prefix of it).
pub const MARKER: [u8; 16] = *b"\x5e\xc2\xe7\xf0secret!\x8a\x91\x03\xd4\x7b";

static WATCHING: AtomicBool = AtomicBool::new(false);
static FOUND: AtomicUsize = AtomicUsize::new(0);
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Checking;

// SAFETY: every request is passed to the system allocator unchanged; `dealloc` only reads the
// block it is given (still allocated and `layout.size()` bytes long) before freeing it.
unsafe impl GlobalAlloc for Checking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if WATCHING.load(Ordering::Relaxed) && layout.size() >= MARKER.len() {
            // SAFETY: `ptr` is a live allocation of `layout.size()` bytes (the caller's
            // contract for `dealloc`); it is read before it is freed.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if block.windows(MARKER.len()).any(|w| w == MARKER) {
                FOUND.fetch_add(1, Ordering::Relaxed);
            }
        }
        // SAFETY: as above; the block came from `System.alloc` through `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static CHECKING: Checking = Checking;

/// Watching for freed copies of [`MARKER`] until dropped.
pub struct Watch {
    _one: MutexGuard<'static, ()>,
}

/// Starts watching (one watching test at a time).
pub fn watch() -> Watch {
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    FOUND.store(0, Ordering::Relaxed);
    WATCHING.store(true, Ordering::Relaxed);
    Watch { _one: one }
}

impl Watch {
    /// Blocks freed with the marker still in them so far.
    pub fn freed_copies(&self) -> usize {
        FOUND.load(Ordering::Relaxed)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        WATCHING.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check itself: a freed copy is seen, a wiped one is not.
    #[test]
    fn a_freed_copy_is_seen_and_a_wiped_one_is_not() {
        let watch = watch();
        drop(std::hint::black_box(MARKER.to_vec()));
        assert_eq!(watch.freed_copies(), 1);
        drop(zeroize::Zeroizing::new(std::hint::black_box(
            MARKER.to_vec(),
        )));
        assert_eq!(watch.freed_copies(), 1);
    }
}
