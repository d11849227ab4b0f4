//! Work a hit hands off to run after it, off its path: the checks of
//! sampled hits (`Route::verify`). A hit only queues its check; a drain
//! task, started when the queue fills from empty, runs what is queued a
//! few milliseconds later, so a hit never pays for waking a worker thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One queued piece of work.
pub(crate) type Job = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// How long queued work waits before it runs: hits that queue meanwhile
/// share one wake-up.
const DRAIN_EVERY: Duration = Duration::from_millis(5);

/// A policy's queue of background work.
#[derive(Default)]
pub(crate) struct Background {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Vec<Job>>,
    /// A drain task is running (or about to).
    draining: AtomicBool,
}

impl Background {
    /// Queues `job`; it runs within a few milliseconds, as a task of its
    /// own. Outside a Tokio runtime it is dropped.
    pub(crate) fn push(&self, job: Job) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job);
        if !self.shared.draining.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(drain(self.shared.clone()));
                }
                Err(_) => {
                    self.shared.draining.store(false, Ordering::Release);
                    self.shared.take();
                }
            }
        }
    }
}

impl Shared {
    fn take(&self) -> Vec<Job> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Runs what is queued every [`DRAIN_EVERY`] until the queue stays empty.
async fn drain(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(DRAIN_EVERY).await;
        let jobs = shared.take();
        if jobs.is_empty() {
            shared.draining.store(false, Ordering::Release);
            // A job queued between the take and the store saw a drain
            // running and started none: keep draining for it.
            let queued = !shared
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            if !queued || shared.draining.swap(true, Ordering::AcqRel) {
                return;
            }
            continue;
        }
        for job in jobs {
            tokio::spawn(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn queued_jobs_run_and_the_drain_stops_then_starts_again() {
        let background = Background::default();
        let ran = Arc::new(AtomicUsize::new(0));
        for round in 1..=2 {
            for _ in 0..10 {
                let ran = ran.clone();
                background.push(Box::pin(async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                }));
            }
            for _ in 0..200 {
                if ran.load(Ordering::SeqCst) == 10 * round
                    && !background.shared.draining.load(Ordering::SeqCst)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(ran.load(Ordering::SeqCst), 10 * round);
            assert!(!background.shared.draining.load(Ordering::SeqCst));
        }
    }
}
