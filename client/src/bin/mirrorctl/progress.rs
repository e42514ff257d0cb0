//! Live progress bars on stderr for `--wait` and `watch`, fed from job views
//! (snapshots, status changes, PROGRESS events). Drawn only when stderr is a
//! terminal; otherwise every call is a no-op, so scripts see clean output.

use std::collections::HashMap;
use std::io::IsTerminal;

use blockmirror_client::names::convergence_name;
use blockmirror_client::{JobView, format_rate, format_size};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::format_eta;

/// `JOB [=====>    ] state  copied/total  dirty  rate  forecast  ETA`.
const TEMPLATE: &str = "{prefix} [{bar:30}] {msg}";

/// One bar per job, or nothing when stderr is not a terminal.
#[derive(Debug)]
pub(crate) struct Progress {
    /// The bars' drawing surface; `None` when disabled.
    multi: Option<MultiProgress>,
    /// Bars by job id.
    bars: HashMap<String, ProgressBar>,
}

impl Progress {
    /// Bars on stderr if it is a terminal.
    pub(crate) fn new() -> Self {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self {
            multi,
            bars: HashMap::new(),
        }
    }

    /// Shows the job's current state; finished jobs lose their bar.
    pub(crate) fn update(&mut self, view: &JobView) {
        let Some(multi) = &self.multi else { return };
        if view.is_finished() {
            self.remove(&view.id);
            return;
        }
        let fill = |bar: &ProgressBar| {
            bar.set_length(view.total_progress.max(1));
            bar.set_position(view.current_progress.min(view.total_progress));
            bar.set_message(status_text(view));
        };
        if let Some(bar) = self.bars.get(&view.id) {
            fill(bar);
            return;
        }
        // Fill the bar before it is shown, so its first frame is complete.
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template(TEMPLATE)
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(view.id.clone());
        fill(&bar);
        self.bars.insert(view.id.clone(), multi.add(bar));
    }

    /// Removes a job's bar.
    pub(crate) fn remove(&mut self, id: &str) {
        if let Some(bar) = self.bars.remove(id) {
            bar.finish_and_clear();
            if let Some(multi) = &self.multi {
                multi.remove(&bar);
            }
        }
    }

    /// Removes every bar.
    pub(crate) fn clear(&mut self) {
        let ids: Vec<String> = self.bars.keys().cloned().collect();
        for id in ids {
            self.remove(&id);
        }
    }

    /// Runs `f` (which prints to stdout) with the bars hidden, so lines and
    /// bars do not mix on a shared terminal.
    pub(crate) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.multi {
            Some(multi) if !self.bars.is_empty() => multi.suspend(f),
            _ => f(),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// `running  512 MiB/1 GiB  dirty 4 MiB  100 MiB/s  converging  ETA 5s`:
/// the server's forecast (none from an older server) and its time to
/// ready, or without a forecast the time to copy what is left. No ETA
/// while diverging or stalled, or once synced.
pub(crate) fn status_text(view: &JobView) -> String {
    let mut s = format!(
        "{}  {}/{}  dirty {}  {}",
        view.state_name(),
        format_size(view.current_progress),
        format_size(view.total_progress),
        format_size(view.dirty_bytes),
        format_rate(view.copy_rate),
    );
    if let Some(name) = convergence_name(view.convergence) {
        s.push_str("  ");
        s.push_str(name);
    }
    let eta = view.eta_to_ready().filter(|d| !d.is_zero());
    if let Some(eta) = eta {
        // Round up: a forecast under a second still reads 1s.
        let secs = eta.as_secs() + u64::from(eta.subsec_nanos() > 0);
        s.push_str(&format!("  ETA {}", format_eta(secs)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_client::proto::{Convergence, Job, JobState};

    #[test]
    fn status_line() {
        let mut job = Job {
            id: "j".into(),
            current_progress_bytes: 512 << 20,
            total_progress_bytes: 1 << 30,
            dirty_bytes: 4 << 20,
            copy_rate_bytes_per_sec: 100 << 20,
            ..Job::default()
        };
        job.set_state(JobState::Running);
        let view = JobView::from_job(&job);
        assert_eq!(
            status_text(&view),
            "running  512 MiB/1 GiB  dirty 4 MiB  100 MiB/s  ETA 6s"
        );
    }

    #[test]
    fn status_line_uses_the_forecast() {
        let mut job = Job {
            id: "j".into(),
            current_progress_bytes: 512 << 20,
            total_progress_bytes: 1 << 30,
            dirty_bytes: 512 << 20,
            copy_rate_bytes_per_sec: 100 << 20,
            dirty_rate_bytes_per_sec: 60 << 20,
            eta_to_ready_ms: Some(12_800),
            ..Job::default()
        };
        job.set_state(JobState::Running);
        job.set_convergence(Convergence::Converging);
        // The server's ETA (13s, counting the guests' writes), not the
        // copy-rate estimate (6s).
        assert_eq!(
            status_text(&JobView::from_job(&job)),
            "running  512 MiB/1 GiB  dirty 512 MiB  100 MiB/s  converging  ETA 13s"
        );

        job.set_convergence(Convergence::Diverging);
        job.eta_to_ready_ms = None;
        assert_eq!(
            status_text(&JobView::from_job(&job)),
            "running  512 MiB/1 GiB  dirty 512 MiB  100 MiB/s  diverging"
        );

        job.set_state(JobState::Ready);
        job.set_convergence(Convergence::Synced);
        job.current_progress_bytes = 1 << 30;
        job.dirty_bytes = 0;
        job.eta_to_ready_ms = Some(0);
        assert_eq!(
            status_text(&JobView::from_job(&job)),
            "ready  1 GiB/1 GiB  dirty 0 B  100 MiB/s  synced"
        );
    }
}
