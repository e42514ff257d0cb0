//! A small pool of I/O threads for short local operations (page-cache
//! `pwrite`, `fallocate`), which wakes threads sparingly.
//!
//! Why not `tokio::task::spawn_blocking`: it wakes an idle thread for every
//! job, so under a queue of 4 KiB writes each one costs a thread wake-up and
//! a sleep — two context switches, which were most of the CPU a 4 KiB NBD
//! write cost. Here a thread that finishes a job takes the next one from
//! the queue without sleeping, and a submitter wakes another thread only
//! when more jobs wait than threads are awake to take them. So a burst of
//! short writes is drained by one or two threads that stay on CPU.
//!
//! The price is that a job may wait behind the one an awake thread is
//! running. That is why only operations that do not wait on a network or a
//! device queue come here (file backends' reads and writes, never flushes,
//! never a remote target): those take microseconds. Everything else stays
//! on tokio's blocking pool, which never makes a job wait for another.

use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// The process-wide pool.
#[derive(Debug)]
pub(crate) struct IoPool {
    state: Mutex<State>,
    work: Condvar,
    max_threads: usize,
}

struct State {
    queue: VecDeque<Job>,
    /// Threads started (they never exit; there are at most `max_threads`).
    threads: usize,
    /// Threads waiting on `work`.
    sleeping: usize,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("queued", &self.queue.len())
            .field("threads", &self.threads)
            .field("sleeping", &self.sleeping)
            .finish()
    }
}

impl IoPool {
    /// The pool, started on first use with up to two threads per CPU (at
    /// least four): enough to keep a device queue busy with buffered I/O,
    /// few enough that they rarely contend.
    pub(crate) fn global() -> &'static IoPool {
        static POOL: OnceLock<IoPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
            IoPool::new((2 * cpus).max(4))
        })
    }

    fn new(max_threads: usize) -> Self {
        Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                threads: 0,
                sleeping: 0,
            }),
            work: Condvar::new(),
            max_threads,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Jobs run outside the lock and catch their own panics (the result
        // channel reports them), so the queue is never left half-updated.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on a pool thread and waits for its result.
    ///
    /// # Errors
    /// `f`'s error, or an error if `f` panicked.
    pub(crate) async fn run<T, F>(&'static self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(io::Error::other("I/O thread panicked")));
            // The waiter may have gone (its request was cancelled).
            let _ = tx.send(r);
        }));
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("I/O pool stopped")))
    }

    fn submit(&'static self, job: Job) {
        let mut st = self.lock();
        st.queue.push_back(job);
        let awake = st.threads - st.sleeping;
        if st.queue.len() <= awake {
            // An awake thread takes it when it finishes its current job.
            return;
        }
        if st.sleeping > 0 {
            drop(st);
            self.work.notify_one();
        } else if st.threads < self.max_threads {
            st.threads += 1;
            let n = st.threads;
            drop(st);
            let spawned = std::thread::Builder::new()
                .name(format!("bm-io-{n}"))
                .spawn(move || self.worker());
            if spawned.is_err() {
                // Out of threads: the ones running will get to the job.
                self.lock().threads -= 1;
            }
        }
    }

    fn worker(&self) {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                job();
                st = self.lock();
                continue;
            }
            st.sleeping += 1;
            st = self
                .work
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.sleeping -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_job_runs_once_and_returns_its_result() {
        let pool: &'static IoPool = Box::leak(Box::new(IoPool::new(3)));
        let ran = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..500_u64)
            .map(|i| {
                let ran = Arc::clone(&ran);
                tokio::spawn(async move {
                    pool.run(move || {
                        ran.fetch_add(1, Ordering::Relaxed);
                        Ok(i * 2)
                    })
                    .await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u64 * 2);
        }
        assert_eq!(ran.load(Ordering::Relaxed), 500);
        assert!(pool.lock().threads <= 3);
    }

    #[tokio::test]
    async fn errors_and_panics_come_back_as_errors() {
        let pool: &'static IoPool = Box::leak(Box::new(IoPool::new(1)));
        let e = pool
            .run(|| -> io::Result<()> { Err(io::Error::from(io::ErrorKind::NotFound)) })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = pool
            .run(|| -> io::Result<()> { panic!("boom") })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("panicked"));
        // The thread survived the panic and serves the next job.
        assert_eq!(pool.run(|| Ok(7)).await.unwrap(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_wakes_another_thread() {
        // Job A holds its thread until job C has run; B and C queue behind
        // it. Two queued jobs with one thread awake must start a second
        // thread, or this never finishes.
        let pool: &'static IoPool = Box::leak(Box::new(IoPool::new(2)));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let a = tokio::spawn(pool.run(move || {
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .map_err(|_| io::Error::other("job C never ran"))
        }));
        while !pool.lock().queue.is_empty() || pool.lock().threads == 0 {
            tokio::task::yield_now().await;
        }
        let b = tokio::spawn(pool.run(|| Ok(())));
        let c = tokio::spawn(pool.run(move || tx.send(()).map_err(io::Error::other)));
        b.await.unwrap().unwrap();
        c.await.unwrap().unwrap();
        a.await.unwrap().unwrap();
        assert_eq!(pool.lock().threads, 2);
    }
}
