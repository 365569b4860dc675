//! A worker thread that starts on another CPU than its parent's.
//!
//! Linux queues a new thread on the CPU of the thread that created it. On a small VM the other,
//! idle CPU then only takes it over when the load balancer next runs, up to a timer tick later:
//! measured on this project's 2-vCPU machine, the kernel-hashing thread of `cvm-measure snp`
//! began 0 to 5 ms late, or ran on its parent's CPU and delayed it instead. Here the thread is
//! made to wait, unscheduled, until its parent has taken the parent's CPU out of its affinity
//! mask; it then wakes where it can run at once (3 ms earlier on the median run).
//!
//! Placement is only a matter of speed: where the mask cannot be set (one CPU, a restricted
//! mask, an unsupported call) the thread runs where the scheduler puts it.

use std::sync::mpsc;
use std::thread::JoinHandle;

/// Runs `work` on a new thread kept off the calling thread's current CPU where another is
/// allowed.
pub fn spawn_on_another_cpu<T, F>(work: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_placed(work).0
}

/// The thread, and the CPU it was kept off (none where it could not be placed).
fn spawn_placed<T, F>(work: F) -> (JoinHandle<T>, Option<usize>)
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tid_sender, tid) = mpsc::channel();
    let (start_sender, start) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tid_sender.send(unsafe { libc::gettid() });
        // Wait until the parent has placed this thread (or gave up: the sender is dropped).
        let _ = start.recv();
        work()
    });
    let avoided = tid.recv().ok().and_then(keep_off_current_cpu);
    drop(start_sender);
    (handle, avoided)
}

/// Sets thread `tid`'s affinity to the calling thread's allowed CPUs less the one it runs on,
/// and returns that one.
fn keep_off_current_cpu(tid: libc::pid_t) -> Option<usize> {
    // SAFETY: cpu_set_t is plain data for which all zeroes is the empty set; the calls get
    // its exact size and a valid pointer.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
            return None;
        }
        let here = usize::try_from(libc::sched_getcpu()).ok()?;
        if here >= 8 * size || !libc::CPU_ISSET(here, &allowed) || libc::CPU_COUNT(&allowed) < 2 {
            return None;
        }
        libc::CPU_CLR(here, &mut allowed);
        (libc::sched_setaffinity(tid, size, &allowed) == 0).then_some(here)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_returns_its_result_off_the_parents_cpu() {
        // SAFETY: as in keep_off_current_cpu.
        let allowed = unsafe {
            let mut allowed: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed),
                0
            );
            libc::CPU_COUNT(&allowed)
        };
        for _ in 0..200 {
            let (worker, avoided) = spawn_placed(|| {
                // SAFETY: sched_getcpu has no preconditions.
                (unsafe { libc::sched_getcpu() }, 6 * 7)
            });
            let (worker_cpu, answer) = worker.join().unwrap();
            assert_eq!(answer, 42);
            match avoided {
                Some(cpu) => assert_ne!(usize::try_from(worker_cpu).ok(), Some(cpu)),
                None => assert!(allowed < 2, "{allowed} CPUs allowed, yet none avoided"),
            }
        }
    }
}
