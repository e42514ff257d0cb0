//! The job life cycle of QEMU's job model: states, legal transitions and
//! which API verbs each state allows.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A job's state (QEMU's `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Recorded, not started.
    Created,
    /// Copying; not yet in sync.
    Running,
    /// Paused before READY.
    Paused,
    /// In sync: the target follows the source until complete or cancel.
    Ready,
    /// Paused after READY.
    Standby,
    /// Told to finish; converging before it becomes pending.
    Waiting,
    /// Finished its work; waits for finalize (pivot).
    Pending,
    /// Cancelled or failed; winding down.
    Aborting,
    /// Done; waits to be dismissed.
    Concluded,
    /// Dismissed; gone.
    Null,
}

impl JobStatus {
    /// Every state, in life-cycle order.
    pub const ALL: [Self; 10] = [
        Self::Created,
        Self::Running,
        Self::Paused,
        Self::Ready,
        Self::Standby,
        Self::Waiting,
        Self::Pending,
        Self::Aborting,
        Self::Concluded,
        Self::Null,
    ];

    /// The lowercase QEMU name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Ready => "ready",
            Self::Standby => "standby",
            Self::Waiting => "waiting",
            Self::Pending => "pending",
            Self::Aborting => "aborting",
            Self::Concluded => "concluded",
            Self::Null => "null",
        }
    }

    /// True once the job can no longer change the volume (concluded, null).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Concluded | Self::Null)
    }

    /// QEMU's state transition table.
    pub fn can_become(self, to: Self) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running | Aborting)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready | Aborting)
                | (Waiting, Pending | Aborting)
                | (Pending, Concluded | Aborting)
                | (Aborting, Concluded)
                | (Concluded, Null)
        )
    }

    /// Whether `verb` is allowed in this state.
    pub fn allows(self, verb: Verb) -> bool {
        use JobStatus::*;
        match verb {
            Verb::Cancel => matches!(
                self,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed => {
                matches!(self, Created | Running | Paused | Ready | Standby)
            }
            Verb::Change => matches!(self, Running | Paused | Ready | Standby),
            Verb::Complete => self == Ready,
            Verb::Finalize => self == Pending,
            Verb::Dismiss => self == Concluded,
        }
    }

    /// `Ok` if this state allows `verb`; otherwise the refusal every front
    /// end shows, naming the state and the states that would allow it.
    ///
    /// # Errors
    /// `FailedPrecondition`.
    pub fn check(self, job_id: &str, verb: Verb) -> crate::error::Result<()> {
        if self.allows(verb) {
            return Ok(());
        }
        let allowed: Vec<&str> = Self::allowing(verb).into_iter().map(Self::as_str).collect();
        Err(crate::error::EngineError::precondition(format!(
            "job {job_id:?} is {self}; {verb} is allowed only when it is {}",
            allowed.join(", ")
        )))
    }

    /// The states that allow `verb`, for error messages.
    pub fn allowing(verb: Verb) -> Vec<Self> {
        Self::ALL.into_iter().filter(|s| s.allows(verb)).collect()
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API verb on a job (QEMU's `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Cancel (or force-cancel).
    Cancel,
    /// Pause copying.
    Pause,
    /// Resume copying.
    Resume,
    /// Change the copy rate limit.
    SetSpeed,
    /// Change the copy mode.
    Change,
    /// Converge and pivot.
    Complete,
    /// Pivot a pending job.
    Finalize,
    /// Forget a concluded job.
    Dismiss,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SetSpeed => "set-speed",
            Self::Change => "change",
            Self::Complete => "complete",
            Self::Finalize => "finalize",
            Self::Dismiss => "dismiss",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_concluded_are_dead_ends() {
        for s in JobStatus::ALL {
            assert!(!JobStatus::Null.can_become(s));
            assert_eq!(JobStatus::Concluded.can_become(s), s == JobStatus::Null);
        }
    }

    #[test]
    fn complete_only_from_ready() {
        assert_eq!(JobStatus::allowing(Verb::Complete), vec![JobStatus::Ready]);
        assert_eq!(
            JobStatus::allowing(Verb::Dismiss),
            vec![JobStatus::Concluded]
        );
    }
}
