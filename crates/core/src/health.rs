//! Local health: a slow observer should not accuse healthy peers.
//!
//! Lifeguard (Dadgar et al., 2018) keeps a "local health multiplier" (LHM): a small score that
//! rises when there is evidence that *this* node is the slow one and falls back as things go well.
//! Probe and suspicion timeouts are scaled by `1 + score`, so a starved or paused node waits
//! longer before it accuses anyone.
//!
//! The evidence we count:
//! - a failure-detector timer that fires late (the process was starved or stopped): +1;
//! - a peer we suspected refuted the suspicion (our accusation was wrong): +1;
//! - a probe period that starts on time: -1.

use std::time::Duration;

/// Default maximum score (Lifeguard's recommended value): timeouts stretch at most 9x.
pub const DEFAULT_MAX_SCORE: u32 = 8;

/// The local health score.
#[derive(Debug, Clone)]
pub struct LocalHealth {
    score: u32,
    max: u32,
    late_after: Duration,
}

impl LocalHealth {
    /// A healthy score; a timer is "late" when it fires `late_after` past its deadline.
    pub fn new(max: u32, late_after: Duration) -> Self {
        LocalHealth {
            score: 0,
            max,
            late_after,
        }
    }

    /// Current score (0 = healthy).
    pub fn score(&self) -> u32 {
        self.score
    }

    /// Factor applied to probe and suspicion timeouts.
    pub fn multiplier(&self) -> u32 {
        1 + self.score
    }

    /// Scales a timeout by the multiplier.
    pub fn scale(&self, d: Duration) -> Duration {
        d * self.multiplier()
    }

    /// A timer fired `lateness` after its deadline. Returns whether it counted as late.
    pub fn timer_fired(&mut self, lateness: Duration) -> bool {
        if lateness > self.late_after {
            self.bump();
            true
        } else {
            false
        }
    }

    /// A peer refuted our suspicion of it.
    pub fn suspicion_refuted(&mut self) {
        self.bump();
    }

    /// A probe period started on time.
    pub fn period_ok(&mut self) {
        self.score = self.score.saturating_sub(1);
    }

    fn bump(&mut self) {
        self.score = (self.score + 1).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_timers_raise_and_good_periods_lower_the_score() {
        let mut h = LocalHealth::new(DEFAULT_MAX_SCORE, Duration::from_millis(250));
        assert_eq!(h.multiplier(), 1);
        assert!(!h.timer_fired(Duration::from_millis(100)));
        assert!(h.timer_fired(Duration::from_secs(3)));
        h.suspicion_refuted();
        assert_eq!(h.score(), 2);
        assert_eq!(h.scale(Duration::from_secs(1)), Duration::from_secs(3));
        h.period_ok();
        h.period_ok();
        h.period_ok();
        assert_eq!(h.score(), 0);
    }

    #[test]
    fn score_is_capped() {
        let mut h = LocalHealth::new(3, Duration::ZERO);
        for _ in 0..10 {
            h.timer_fired(Duration::from_secs(1));
        }
        assert_eq!(h.multiplier(), 4);
    }
}
