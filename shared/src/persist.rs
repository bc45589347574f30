//! A thread of its own for a component's persistence.
//!
//! tokio's blocking pool is shared with request work (enrolment's key checks
//! and signatures, admin calls): a burst of those queues in front of a
//! persister that runs there, so revocations are enforced but not made
//! durable or acknowledged, and audit records wait. A [`Worker`] runs its
//! jobs in order on one named thread that nothing else uses.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// The worker thread is gone (it panicked in a job, or was never started).
#[derive(Debug, thiserror::Error)]
#[error("the {0} thread is gone")]
pub struct Gone(pub &'static str);

/// One thread running persistence jobs in the order they are given.
#[derive(Debug, Clone)]
pub struct Worker {
    name: &'static str,
    tx: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the thread; it ends when the last handle is dropped.
    pub fn start(name: &'static str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Self { name, tx })
    }

    /// Runs `f` on the worker thread and waits (asynchronously) for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Gone> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = reply.send(f());
            }))
            .map_err(|_| Gone(self.name))?;
        answer.await.map_err(|_| Gone(self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_while_the_blocking_pool_is_taken() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (release, held) = std::sync::mpsc::channel::<()>();
            // Request work holding the only blocking thread.
            let hog = tokio::task::spawn_blocking(move || held.recv());
            let worker = Worker::start("test-persist").expect("worker");
            let done =
                tokio::time::timeout(std::time::Duration::from_secs(10), worker.run(|| 7)).await;
            release.send(()).expect("release");
            let _ = hog.await;
            assert_eq!(
                done.expect("the job waited for the blocking pool")
                    .expect("ran"),
                7
            );
        });
    }

    #[test]
    fn jobs_run_in_order_and_a_panicking_job_is_reported_not_hung() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let worker = Worker::start("test-order").expect("worker");
            let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut waits = Vec::new();
            for i in 0..10 {
                let seen = seen.clone();
                waits.push(worker.run(move || seen.lock().expect("lock").push(i)));
            }
            for w in waits {
                w.await.expect("ran");
            }
            assert_eq!(*seen.lock().expect("lock"), (0..10).collect::<Vec<_>>());
            let err = worker.run(|| panic!("a job fails")).await;
            assert!(matches!(err, Err(Gone("test-order"))), "{err:?}");
            assert!(
                worker.run(|| ()).await.is_err(),
                "a later job must not hang"
            );
        });
    }
}
